"""Styles: A1111's styles.csv, applied and taken back out exactly as A1111 does; files that are
wrong never stop the studio."""

from __future__ import annotations

import itertools

import pytest

from studio.engine import styles as St
from studio.errors import ValidationError


@pytest.mark.parametrize("style,prompt,expected", [
    ("cinematic still of {prompt}, film grain", "a fox", "cinematic still of a fox, film grain"),
    ("masterpiece", "a fox", "a fox, masterpiece"),
    ("masterpiece", "  a fox  ", "a fox, masterpiece"),
    ("masterpiece", "", "masterpiece"),
    ("", "a fox", "a fox"),
    ("{prompt}", "a fox", "a fox"),
    ("{prompt} and {prompt}", "a fox", "a fox and a fox"),
    ("{prompt}, night", "", ", night"),
])
def test_merge_prompts_is_a1111s(style, prompt, expected):
    assert St.merge_prompts(style, prompt) == expected


def test_extract_style_text_is_a1111s():
    # the examples of A1111's docstring
    assert St.extract_style_text_from_prompt("masterpiece", "1girl, art by greg, masterpiece") == (True, "1girl, art by greg")
    assert St.extract_style_text_from_prompt("masterpiece, {prompt}", "masterpiece, 1girl, art by greg") == \
        (True, "1girl, art by greg")
    assert St.extract_style_text_from_prompt("masterpiece, {prompt}", "exquisite, 1girl, art by greg") == \
        (False, "exquisite, 1girl, art by greg")
    assert St.extract_style_text_from_prompt("{prompt} x {prompt}", "a x b") == (False, "a x b")  # no crash


@pytest.fixture
def library(tmp_path):
    return St.StyleLibrary(tmp_path / "styles.csv")  # the defaults, and no user file yet


def test_the_default_styles(library):
    assert library.notes == []
    assert len(library.names()) >= 8
    for name in ("Photo", "Cinematic", "Anime", "Watercolor", "Line art", "3D render", "Pixel art"):
        style = library.styles[name]
        assert style.prompt.strip() and style.negative_prompt.strip() and style.source == "styles.csv"
    assert any("{prompt}" not in s.prompt for s in library.styles.values())  # one appends, the rest wrap


def test_styles_apply_in_order(library):
    prompt, negative = library.apply("a red fox", "blurry", ["Cinematic", "Photo"])
    cine, photo = library.styles["Cinematic"], library.styles["Photo"]
    assert prompt == St.merge_prompts(photo.prompt, cine.prompt.replace("{prompt}", "a red fox"))
    assert negative == f"blurry, {cine.negative_prompt}, {photo.negative_prompt}"
    assert library.apply("a fox", "", []) == ("a fox", "") == library.apply("a fox", "", None)


def test_every_default_style_and_pair_round_trips(library):
    names = library.names()
    for chosen in [*([n] for n in names), *map(list, itertools.permutations(names, 2))]:
        prompt, negative = library.apply("a red fox in the snow", "text", chosen)
        assert library.extract(prompt, negative) == (chosen, "a red fox in the snow", "text"), chosen


def test_a_prompt_without_styles_extracts_none(library):
    assert library.extract("a red fox", "blurry") == ([], "a red fox", "blurry")


def test_unknown_and_bad_style_requests_are_refused(library):
    for bad, word in ((["Nope"], "'Nope'"), ("Nope", "'Nope'"), ([1], "list of style names"),
                      (["Photo"] * 17, "At most")):
        with pytest.raises(ValidationError) as e:
            library.apply("a", "", bad)
        assert e.value.field == "styles" and word in str(e.value)


def _write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_the_users_file_wins_on_a_name_and_adds_its_own(tmp_path):
    _write(tmp_path / "styles.csv", 'name,prompt,negative_prompt\nPhoto,"my photo of {prompt}",mine\nNoir,"{prompt}, noir",\n')
    lib = St.StyleLibrary.for_data_dir(tmp_path)
    assert lib.styles["Photo"].prompt == "my photo of {prompt}" and lib.styles["Photo"].negative_prompt == "mine"
    assert lib.styles["Noir"].negative_prompt == "" and "Anime" in lib.styles
    assert lib.notes == []


def test_an_a1111_file_reads_as_a1111_writes_it(tmp_path):
    # A1111 writes utf-8-sig with a BOM and \r\n line ends; prompts with commas or newlines are quoted
    text = ('name,prompt,negative_prompt\r\n'
            '"Sci-fi, neon","{prompt}, neon lights,\r\nrain",blurry\r\n'
            '# a comment row,ignored,\r\n'
            '\r\n'
            'Émoji ✨,"sparkles ✨",\r\n')
    _write(tmp_path / "styles.csv", text, "utf-8-sig")
    lib = St.StyleLibrary(tmp_path / "styles.csv", default_file=None)
    assert lib.names() == ["Sci-fi, neon", "Émoji ✨"] and lib.notes == []
    assert lib.apply("a city", "", ["Sci-fi, neon"])[0] == "a city, neon lights,\r\nrain"


def test_the_old_two_column_format(tmp_path):
    _write(tmp_path / "styles.csv", "name,text\nOld,old style text\n")
    lib = St.StyleLibrary(tmp_path / "styles.csv", default_file=None)
    assert lib.styles["Old"].prompt == "old style text" and lib.styles["Old"].negative_prompt == ""


def test_malformed_rows_are_skipped_with_a_note(tmp_path):
    _write(tmp_path / "styles.csv",
           "name,prompt,negative_prompt\n"
           "Good,good {prompt},\n"
           ",no name here,\n"
           "Commas,an unquoted, prompt, with commas\n"
           "Short\n")
    lib = St.StyleLibrary(tmp_path / "styles.csv", default_file=None)
    assert lib.names() == ["Good", "Short"]  # a row with fewer fields is a style with empty prompts
    assert len(lib.notes) == 1
    assert "line 3 (no name)" in lib.notes[0] and "line 4 (Commas: more fields than the header" in lib.notes[0]


@pytest.mark.parametrize("content,word", [
    (b"\x89PNG\r\n\x1a\n\0\0\0IHDR", "not UTF-8"),
    (b"name,prompt\nA\0B,x\n", "binary"),
    ("name,prompt\nCaf\xe9,x\n".encode("latin-1"), "not UTF-8"),
    (b"title,body\nA,B\n", "no 'name' and 'prompt' columns"),
    (b"", "no 'name' and 'prompt' columns"),
])
def test_files_that_are_not_styles_are_skipped_with_a_note(tmp_path, content, word):
    (tmp_path / "styles.csv").write_bytes(content)
    lib = St.StyleLibrary(tmp_path / "styles.csv")
    assert "Photo" in lib.styles  # the defaults still load
    assert len(lib.notes) == 1 and word in lib.notes[0]


def test_a_file_too_large_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(St, "MAX_STYLES_BYTES", 1000)
    _write(tmp_path / "styles.csv", "name,prompt\n" + "".join(f"S{i},p\n" for i in range(300)))
    lib = St.StyleLibrary(tmp_path / "styles.csv", default_file=None)
    assert lib.styles == {} and "are not read" in lib.notes[0]


def test_too_many_rows_and_too_long_fields_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(St, "MAX_STYLES", 10)
    rows = "".join(f"S{i},p\n" for i in range(20)) + "Long," + "x" * (St.MAX_PROMPT_CHARS + 1) + "\n"
    _write(tmp_path / "styles.csv", "name,prompt\n" + rows)
    lib = St.StyleLibrary(tmp_path / "styles.csv", default_file=None)
    assert len(lib.styles) == 10 and "only the first 10" in lib.notes[0]
    monkeypatch.setattr(St, "MAX_STYLES", 5000)
    lib.reload()
    assert "Long" not in lib.styles and "over 10,000 characters" in lib.notes[0]


def test_reload_sees_an_edited_file(tmp_path):
    path = _write(tmp_path / "styles.csv", "name,prompt\nA,a\n")
    lib = St.StyleLibrary(path, default_file=None)
    _write(path, "name,prompt\nB,b\n")
    lib.reload()
    assert lib.names() == ["B"]
    path.unlink()
    lib.reload()
    assert lib.names() == [] and lib.notes == []  # no user file is no user styles
