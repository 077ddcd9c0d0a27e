"""Live token counts: the tokenizers' own numbers, what is cut, and no text encoder run."""

from __future__ import annotations

import time

import pytest

from studio.engine import tokens as T


@pytest.fixture(scope="module")
def toks(tiny_family):
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = tiny_family["sd3.5-medium"]
    return CLIPTokenizer.from_pretrained(folder / "tokenizer"), T5TokenizerFast.from_pretrained(folder / "tokenizer_3")


def _words(n: int) -> str:
    words = ["red", "fox", "cat", "dog", "photo"]
    return " ".join(words[i % len(words)] for i in range(n))


@pytest.mark.parametrize("prompt", ["a red fox", "a photo of a cat, with a dog", "", "zebra quux!", _words(60)])
def test_counts_are_the_tokenizers_own(toks, prompt):
    clip, t5 = toks
    c = T.count(clip, t5, prompt, 256)
    assert c.clip_tokens == c.clip_used == len(clip(prompt, add_special_tokens=False).input_ids)
    assert c.clip_chunks == 1 and c.clip_truncated == ""
    assert c.t5_tokens == len(t5(prompt).input_ids)  # EOS included, as the pipeline feeds T5
    assert c.t5_limit == 256 and c.t5_truncated == ""


def test_a_200_token_prompt_is_three_chunks(toks):
    c = T.count(*toks, _words(200))
    assert (c.clip_tokens, c.clip_used, c.clip_chunks, c.clip_limit) == (200, 200, 3, 225)
    assert c.clip_truncated == ""  # chunked: CLIP reads it all
    assert c.text().startswith("CLIP 200/225 (3 chunks)")


def test_break_counts_its_chunk_as_a1111_does(toks):
    c = T.count(*toks, "red fox BREAK cat")
    assert (c.clip_tokens, c.clip_used, c.clip_chunks) == (3, 76, 2)


def test_weighting_syntax_is_not_counted_unless_weighting_is_off(toks):
    clip, t5 = toks
    on = T.count(clip, t5, "(red:1.5) [fox]")
    off = T.count(clip, t5, "(red:1.5) [fox]", enabled=False)
    assert on.clip_tokens == 2 and on.t5_tokens == len(t5("red fox").input_ids)
    assert off.clip_tokens == len(clip("(red:1.5) [fox]", add_special_tokens=False).input_ids) > 2


def test_t5_says_what_it_will_not_read(toks):
    clip, t5 = toks
    prompt = _words(20)
    c = T.count(clip, t5, prompt, max_sequence_length=8)
    assert c.t5_tokens == 21 and c.t5_limit == 8
    kept = t5(prompt, max_length=8, truncation=True).input_ids  # what the pipeline feeds T5
    assert kept[-1] == t5.eos_token_id
    assert (t5.decode(kept[:-1]) + " " + c.t5_truncated).split() == prompt.split()
    assert "T5 8/8 — cut: " in c.text()


def test_with_weighting_off_clip_cuts_at_75_like_the_pipeline(toks):
    clip, t5 = toks
    prompt = _words(80)
    c = T.count(clip, t5, prompt, enabled=False)
    assert (c.clip_tokens, c.clip_chunks) == (75, 1)
    assert c.clip_truncated.split() == prompt.split()[75:]
    kept = clip(prompt, max_length=77, truncation=True).input_ids  # the pipeline's CLIP input
    assert len(kept) == 77 and clip.decode(kept[1:-1]).split() == prompt.split()[:75]


def test_prompt_3_is_counted_for_t5(toks):
    clip, t5 = toks
    c = T.count(clip, t5, "red", prompt_3=_words(9))
    assert c.clip_tokens == 1 and c.t5_tokens == 10


def test_without_t5(toks):
    c = T.count(toks[0], None, "a red fox")
    assert not c.has_t5 and c.text() == "CLIP 3/75 · T5 off"


def test_count_for_reads_the_pipelines_tokenizers_and_runs_no_encoder(toks):
    class Boom:
        def __call__(self, *a, **k):
            raise AssertionError("a text encoder ran")

    class Pipe:
        tokenizer, tokenizer_3 = toks
        text_encoder = text_encoder_2 = text_encoder_3 = Boom()

    assert T.count_for(Pipe(), "a red fox", 77).t5_tokens == len(toks[1]("a red fox").input_ids)
    Pipe.text_encoder_3 = None
    assert not T.count_for(Pipe(), "a red fox").has_t5


def test_fast_enough_for_every_keystroke(toks):
    prompt = "a (red:1.2) fox, " * 150  # ~900 tokens
    T.count(*toks, prompt, 512)
    started = time.perf_counter()
    for _ in range(5):
        T.count(*toks, prompt, 512)
    assert (time.perf_counter() - started) / 5 < 0.5  # (~20 ms on an idle core)


def test_notes_say_what_will_be_cut(toks):
    clip, t5 = toks
    assert T.count(clip, t5, "a red fox").notes() == []
    notes = T.count(clip, t5, _words(90), max_sequence_length=16, enabled=False).notes()
    assert len(notes) == 2 and "first 75 tokens" in notes[0] and "T5 reads 16" in notes[1]
    assert "up to 512" in notes[1]
    assert T.count(clip, t5, _words(90), max_sequence_length=16).notes()[0].startswith("The prompt is 91 T5")
