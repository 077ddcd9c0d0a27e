"""Prompt styles in A1111's ``styles.csv`` format: ``name,prompt,negative_prompt``.

A style's prompt holds the user's prompt where it says ``{prompt}``; without the placeholder it
is appended after ", " — A1111's ``merge_prompts``, copied below, as is the inverse
(``extract_style_text_from_prompt``) that turns a styled prompt back into the user's prompt and
the names of its styles. A1111 writes the styled prompt into its infotext and no style names;
its reader infers ``Styles array`` by matching the prompt against the known styles
(``extract_styles_from_prompt``, setting "Apply if any"), which :meth:`StyleLibrary.extract`
does here.

Two files are read: the project's defaults (``assets/styles.csv``) and the user's
(``<data-dir>/styles.csv``, where an A1111 user can drop their own file); the user's wins on a
name both have. Reading never fails: a file too large, not UTF-8 or not CSV, and a row without a
name or with more fields than the header (an unquoted comma, most often) are skipped, each with a
note in :attr:`StyleLibrary.notes`. As A1111, a row whose name starts with ``#`` is a comment
and the old two-column format (``name,text``) is read too.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from studio.engine.limits import MAX_PROMPT_CHARS, MAX_STYLES_PER_REQUEST
from studio.errors import ValidationError

DEFAULT_STYLES = Path(__file__).resolve().parents[2] / "assets" / "styles.csv"
MAX_STYLES_BYTES = 4 << 20  # a styles file larger than this is not read
MAX_STYLES = 5000  # rows read per file
MAX_STYLE_NAME = 200  # characters


@dataclass(frozen=True)
class Style:
    """One row of a styles file: its name, prompt, negative prompt and the file it came from."""
    name: str
    prompt: str
    negative_prompt: str
    source: str  # the file it came from


# --- A1111 modules/styles.py, verbatim ---------------------------------------------------------

def merge_prompts(style_prompt: str, prompt: str) -> str:
    """``prompt`` put into ``style_prompt`` at ``{prompt}``, or followed by it after ", " when the
    style has no placeholder."""
    if "{prompt}" in style_prompt:
        res = style_prompt.replace("{prompt}", prompt)
    else:
        parts = filter(None, (prompt.strip(), style_prompt.strip()))
        res = ", ".join(parts)

    return res


def apply_styles_to_prompt(prompt, styles):
    """``prompt`` with each style prompt of ``styles`` merged in, in order."""
    for style in styles:
        prompt = merge_prompts(style, prompt)

    return prompt


def extract_style_text_from_prompt(style_text, prompt):
    """Extracts the text from a given prompt based on a provided style text (A1111's).

    extract_style_text_from_prompt("masterpiece", "1girl, art by greg, masterpiece") outputs (True, "1girl, art by greg")
    extract_style_text_from_prompt("masterpiece, {prompt}", "masterpiece, 1girl, art by greg") outputs (True, "1girl, art by greg")
    extract_style_text_from_prompt("masterpiece, {prompt}", "exquisite, 1girl, art by greg") outputs (False, "exquisite, 1girl, art by greg")
    """

    stripped_prompt = prompt.strip()
    stripped_style_text = style_text.strip()

    if "{prompt}" in stripped_style_text:
        left, _, right = stripped_style_text.partition("{prompt}")  # Forge's; A1111's split() raises on two
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            prompt = stripped_prompt[len(left):len(stripped_prompt)-len(right)]
            return True, prompt
    else:
        if stripped_prompt.endswith(stripped_style_text):
            prompt = stripped_prompt[:len(stripped_prompt)-len(stripped_style_text)]

            if prompt.endswith(', '):  # noqa: FURB188 (A1111's, verbatim)
                prompt = prompt[:-2]

            return True, prompt

    return False, prompt


def extract_original_prompts(style: Style, prompt, negative_prompt):
    """
    Takes a style and compares it to the prompt and negative prompt. If the style
    matches, returns True plus the prompt and negative prompt with the style text
    removed. Otherwise, returns False with the original prompt and negative prompt.
    """
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt

    match_positive, extracted_positive = extract_style_text_from_prompt(style.prompt, prompt)
    if not match_positive:
        return False, prompt, negative_prompt

    match_negative, extracted_negative = extract_style_text_from_prompt(style.negative_prompt, negative_prompt)
    if not match_negative:
        return False, prompt, negative_prompt

    return True, extracted_positive, extracted_negative


# --- reading -----------------------------------------------------------------------------------

def read_styles(path: str | Path) -> tuple[list[Style], list[str]]:
    """The styles of one file and the notes on what was skipped; a missing file is no styles."""
    path = Path(path)
    notes: list[str] = []
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [f"Styles file {path.name}: cannot be read ({e.strerror or e})."]
    if size > MAX_STYLES_BYTES:
        return [], [(f"Styles file {path.name} is {size / 2**20:.1f} MB; files over {MAX_STYLES_BYTES >> 20} MB "
                     "are not read. Split it or remove unused styles.")]
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [f"Styles file {path.name} is not UTF-8 text; save it as UTF-8 CSV."]
    except OSError as e:
        return [], [f"Styles file {path.name}: cannot be read ({e.strerror or e})."]
    return parse_styles(text, path.name, notes), notes


def parse_styles(text: str, source: str = "styles.csv", notes: list[str] | None = None) -> list[Style]:
    """The styles in CSV ``text`` (A1111's columns), skipping malformed rows with a note each."""
    notes = notes if notes is not None else []
    if "\0" in text:
        notes.append(f"Styles file {source} holds binary data (NUL bytes); it is not a CSV file.")
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        fields = reader.fieldnames or []
    except csv.Error as e:
        notes.append(f"Styles file {source} is not CSV ({e}).")
        return []
    if "name" not in fields or not ({"prompt", "text"} & set(fields)):
        notes.append(f"Styles file {source} has no 'name' and 'prompt' columns (found: {', '.join(fields)[:80]}); "
                     "A1111's header is: name,prompt,negative_prompt.")
        return []
    out: list[Style] = []
    skipped: list[str] = []
    try:
        for row in reader:
            line = reader.line_num
            if len(out) >= MAX_STYLES:
                notes.append(f"Styles file {source}: only the first {MAX_STYLES} styles are read.")
                break
            name = (row.get("name") or "").strip()
            if not name and not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # an empty row
            if name.startswith("#"):
                continue  # a comment, as A1111 reads it
            prompt = row.get("prompt") if "prompt" in row else row.get("text")
            negative = row.get("negative_prompt")
            if None in row:
                skipped.append(f"line {line} ({name[:40] or 'no name'}: more fields than the header — "
                               "quote a prompt that holds commas)")
            elif not name:
                skipped.append(f"line {line} (no name)")
            elif len(name) > MAX_STYLE_NAME:
                skipped.append(f"line {line} (a name over {MAX_STYLE_NAME} characters)")
            elif len(prompt or "") > MAX_PROMPT_CHARS or len(negative or "") > MAX_PROMPT_CHARS:
                skipped.append(f"line {line} ({name[:40]}: a prompt over {MAX_PROMPT_CHARS:,} characters)")
            else:
                out.append(Style(name, prompt or "", negative or "", source))
    except csv.Error as e:
        notes.append(f"Styles file {source}: reading stopped at line {reader.line_num} ({e}).")
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        notes.append(f"Styles file {source}: skipped " + "; ".join(skipped[:5]) + more + ".")
    return out


class StyleLibrary:
    """The styles a user can pick: the defaults, then the user's file over them."""

    def __init__(self, user_file: str | Path | None = None, default_file: str | Path | None = DEFAULT_STYLES):
        self.files = [Path(p) for p in (default_file, user_file) if p is not None]
        self.styles: dict[str, Style] = {}
        self.notes: list[str] = []
        self.reload()

    @classmethod
    def for_data_dir(cls, data_dir: str | Path) -> StyleLibrary:
        """The library of a data dir: the defaults, then ``<data-dir>/styles.csv`` over them."""
        return cls(Path(data_dir) / "styles.csv")

    def reload(self) -> None:
        """Read the files again (a user may edit theirs while the studio runs)."""
        styles: dict[str, Style] = {}
        notes: list[str] = []
        for path in self.files:  # later files win on a name
            found, file_notes = read_styles(path)
            notes += file_notes
            for style in found:
                styles[style.name] = style
        self.styles, self.notes = styles, notes

    def names(self) -> list[str]:
        """The style names, defaults first, in file order."""
        return list(self.styles)

    def get(self, names) -> list[Style]:
        """The named styles, in order; an unknown name is refused (field ``styles``)."""
        if names is None:
            return []
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValidationError("Styles must be a list of style names.", "styles")
        if len(names) > MAX_STYLES_PER_REQUEST:
            raise ValidationError(f"At most {MAX_STYLES_PER_REQUEST} styles apply at once; {len(names)} were given.",
                                  "styles")
        missing = [n for n in names if n not in self.styles]
        if missing:
            known = ", ".join(list(self.styles)[:12]) + (" …" if len(self.styles) > 12 else "")
            raise ValidationError(f"Unknown style {missing[0][:60]!r}. Styles here: {known or 'none'} "
                                  "(add your own to styles.csv in the data folder).", "styles")
        return [self.styles[n] for n in names]

    def apply(self, prompt: str, negative_prompt: str, names) -> tuple[str, str]:
        """``(prompt, negative_prompt)`` with the named styles applied in order (A1111's)."""
        chosen = self.get(names)
        return (apply_styles_to_prompt(prompt or "", [s.prompt for s in chosen]),
                apply_styles_to_prompt(negative_prompt or "", [s.negative_prompt for s in chosen]))

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """A1111's ``extract_styles_from_prompt``: the styles a styled prompt was made with (in
        the order they were applied) and the prompts without them."""
        extracted = []
        prompt, negative_prompt = prompt or "", negative_prompt or ""
        applicable_styles = list(self.styles.values())

        while True:
            found_style = None

            for style in applicable_styles:
                is_match, new_prompt, new_neg_prompt = extract_original_prompts(style, prompt, negative_prompt)
                if is_match:
                    found_style = style
                    prompt = new_prompt
                    negative_prompt = new_neg_prompt
                    break

            if not found_style:
                break

            applicable_styles.remove(found_style)
            extracted.append(found_style.name)

        return list(reversed(extracted)), prompt, negative_prompt
