"""Prompt weighting: A1111's parser to the float, and SD3 embeddings shaped as the pipeline's —
identical to the pipeline's when there is nothing to weight."""

from __future__ import annotations

import pytest

from studio.engine import weighting as W
from studio.errors import ValidationError

# A1111 modules/prompt_parser.py, parse_prompt_attention's docstring (its doctests), verbatim.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]
# More of A1111's behaviour, each worked out from its code.
MORE_EXAMPLES = [
    ("", [["", 1.0]]),
    ("(word:1.3)", [["word", 1.3]]),
    ("(word: 1.3 )", [["word", 1.3]]),  # 1.7+: spaces around the weight
    ("((word))", [["word", 1.2100000000000002]]),
    ("[word]", [["word", 0.9090909090909091]]),
    ("[[word]]", [["word", 0.8264462809917354]]),
    ("(a [b] c)", [["a ", 1.1], ["b", 1.0], [" c", 1.1]]),
    ("(red:0)", [["red", 0.0]]),
    ("(red:-1)", [["red", -1.0]]),
    ("a]b)", [["a]b)", 1.0]]),  # closers with nothing open are text
    ("\\\\back", [["\\back", 1.0]]),
    ("a \\(b\\) c", [["a (b) c", 1.0]]),
    ("time: 5pm", [["time: 5pm", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a BREAK (b:1.5)", [["a", 1.0], ["BREAK", -1], ["", 1.0], ["b", 1.5]]),
    ("BREAKFAST", [["BREAKFAST", 1.0]]),  # a word, not a BREAK
    ("[cat:dog:10]", [["cat:dog:10", 0.9090909090909091]]),  # prompt editing is not parsed: brackets weigh
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES + MORE_EXAMPLES)
def test_parse_is_a1111s(text, expected):
    assert W.parse_prompt_attention(text) == expected
    assert W.parse(text) == tuple((t, float(w)) for t, w in expected)


def test_parse_can_be_turned_off_and_plain_prompts_are_recognised():
    assert W.parse("(red:1.5) fox", enabled=False) == (("(red:1.5) fox", 1.0),)
    assert W.is_plain("a red fox, at night") and W.is_plain("")
    assert not W.is_plain("a (red) fox") and not W.is_plain("a BREAK b") and not W.is_plain("\\(x\\)")


def test_the_cache_key_is_the_parsed_prompt():
    k = W.cache_key
    assert k("a (red:1.0) fox", "") == k("a red fox", "")
    assert k("a (red:1.5) fox", "") != k("a red fox", "")
    assert k("a red fox", "", enabled=False) != k("a red fox", "")
    assert k("(red:1.5)", "", enabled=False) != k("red", "", enabled=False)
    assert k("a", "b", "t5 text") != k("a", "b")
    assert k("(a:1.2)", "", emphasis="No norm") != k("(a:1.2)", "")
    hash(k("a (b:1.2) BREAK c", "[d]", "e", "f"))


# --- chunks -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_family):
    import torch
    from diffusers import StableDiffusion3Pipeline

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    p = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3.5-medium"])
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(before)


def _words(n: int) -> str:
    words = ["red", "fox", "cat", "dog", "photo"]  # one token each in the tiny vocabulary
    return " ".join(words[i % len(words)] for i in range(n))


def test_a_200_token_prompt_is_three_chunks(pipe):
    text = _words(200)
    assert len(pipe.tokenizer(text, add_special_tokens=False).input_ids) == 200
    chunks = W.clip_chunks(pipe.tokenizer, W.parse(text))
    assert [len(t) for t, _ in chunks] == [75, 75, 50]
    assert [m for _, ms in chunks for m in ms] == [1.0] * 200


def test_break_starts_a_chunk_and_weights_follow_their_tokens(pipe):
    chunks = W.clip_chunks(pipe.tokenizer, W.parse("red fox BREAK (cat:1.5) dog"))
    assert [len(t) for t, _ in chunks] == [2, 2]
    assert chunks[1][1] == [1.5, 1.0]
    assert len(W.clip_chunks(pipe.tokenizer, W.parse("BREAK red"))) == 2  # an empty first chunk, as A1111


def test_a_full_chunk_moves_its_tail_after_the_last_comma(pipe):
    comma_id = pipe.tokenizer.get_vocab()[",</w>"]
    near = _words(70) + ", " + _words(10)  # comma at token 70: within 20 of the chunk's end
    chunks = W.clip_chunks(pipe.tokenizer, W.parse(near))
    assert [len(t) for t, _ in chunks] == [71, 10] and chunks[0][0][-1] == comma_id
    far = _words(10) + ", " + _words(70)  # comma at token 10: too far back, the chunk is cut at 75
    assert [len(t) for t, _ in W.clip_chunks(pipe.tokenizer, W.parse(far))] == [75, 6]


# --- encoding -------------------------------------------------------------------------------------

PLAIN = [("a red fox", ""), ("a photo of a cat, with a dog", "red, blurry"), ("", ""), ("fox", "a " * 30)]


def _equal(a, b):
    import torch

    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("prompt,negative", PLAIN)
def test_plain_prompts_give_the_pipelines_tensors_bit_for_bit(pipe, prompt, negative):
    import torch

    with torch.no_grad():
        for length, cfg in ((256, True), (77, True), (512, False), (8, True)):
            ref = pipe.encode_prompt(prompt, None, None, negative_prompt=negative if cfg else None,
                                     do_classifier_free_guidance=cfg, max_sequence_length=length)
            ours = W.encode(pipe, prompt, negative, cfg=cfg, max_sequence_length=length)
            assert _equal(ref, ours)
            assert ours[0].shape == (1, 77 + length, pipe.transformer.config.joint_attention_dim)


def test_plain_prompts_match_without_t5_too(tiny_family):
    import torch
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(tiny_family["sd3.5-medium"], text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        ref = p.encode_prompt("a red fox", None, None, negative_prompt="cat", max_sequence_length=64)
        ours = W.encode(p, "a red fox", "cat", max_sequence_length=64)
    assert _equal(ref, ours) and not ours[0][:, 77:].any()


def test_prompt_3_is_what_t5_reads(pipe):
    import torch

    with torch.no_grad():
        ref = pipe.encode_prompt("a red fox", None, "a photo of a cat", negative_prompt="dog",
                                 negative_prompt_3="blurry", max_sequence_length=32)
        ours = W.encode(pipe, "a red fox", "dog", prompt_3="a photo of a cat", negative_prompt_3="blurry",
                        max_sequence_length=32)
        assert _equal(ref, ours)
        weighted = W.encode(pipe, "a red fox", "", prompt_3="a (cat:1.4)", max_sequence_length=32)
        plain = W.encode(pipe, "a red fox", "", prompt_3="a cat", max_sequence_length=32)
    assert torch.equal(weighted[0][:, :77], plain[0][:, :77])  # CLIP read the prompt
    assert not torch.equal(weighted[0][:, 77:], plain[0][:, 77:])  # T5 read prompt_3, weighted


def test_weight_one_is_no_weight_and_other_weights_change_every_encoder(pipe):
    import torch

    with torch.no_grad():
        plain = W.encode(pipe, "a red fox", "")
        one = W.encode(pipe, "a (red:1.0) fox", "")
        more = W.encode(pipe, "a (red:1.5) fox", "")
        less = W.encode(pipe, "a [red] fox", "")
    assert _equal(plain, one)
    width = pipe.text_encoder.config.hidden_size
    pe, ref = more[0], plain[0]
    assert not torch.equal(pe[:, :77, :width], ref[:, :77, :width])  # CLIP-L
    assert not torch.equal(pe[:, :77, width:2 * width], ref[:, :77, width:2 * width])  # CLIP-G
    assert not torch.equal(pe[:, 77:], ref[:, 77:])  # T5
    assert torch.equal(more[2], plain[2])  # the pooled embedding is the unweighted prompt's
    assert torch.equal(more[1], plain[1]) and torch.equal(more[3], plain[3])  # the negative is untouched
    assert not torch.equal(less[0], ref) and not torch.equal(less[0], pe)


def test_original_emphasis_restores_each_chunks_mean_and_no_norm_does_not(pipe):
    import torch

    with torch.no_grad():
        plain = W.encode(pipe, "a red fox", "", cfg=False)[0]
        orig = W.encode(pipe, "a (red:1.8) fox", "", cfg=False)[0]
        nonorm = W.encode(pipe, "a (red:1.8) fox", "", cfg=False, emphasis="No norm")[0]
    width = pipe.text_encoder.config.hidden_size
    for lo, hi in ((0, width), (width, 2 * width)):  # each CLIP encoder's chunk
        assert orig[0, :77, lo:hi].mean().item() == pytest.approx(plain[0, :77, lo:hi].mean().item(), abs=1e-5)
    assert orig[0, 77:].mean().item() == pytest.approx(plain[0, 77:].mean().item(), abs=1e-5)  # T5
    # the weighted token (position 2: BOS, "a", "red") stands out against its neighbours
    ratio = nonorm[0, 2, :width] / plain[0, 2, :width]
    assert torch.allclose(ratio, torch.full_like(ratio, 1.8), atol=1e-4)


def test_long_prompts_are_chunked_and_cfg_sides_padded_alike(pipe):
    import torch

    long = _words(200)
    with torch.no_grad():
        pe, npe, ppe, _ = W.encode(pipe, long, "blurry", max_sequence_length=64)
        first = W.encode(pipe, _words(75), "", max_sequence_length=64)
        empty = W.encode(pipe, "", "", max_sequence_length=64)
    assert pe.shape == npe.shape == (1, 3 * 77 + 64, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(pe[:, :77], first[0][:, :77])  # chunk 1 is encoded on its own
    assert torch.equal(ppe, first[2])  # pooled: the first chunk's
    assert torch.equal(npe[:, 77:154], empty[0][:, :77])  # the negative is padded with empty chunks
    assert torch.equal(npe[:, 154:231], empty[0][:, :77])


def test_break_gives_each_part_its_own_chunk(pipe):
    import torch

    with torch.no_grad():
        both = W.encode(pipe, "a red fox BREAK a cat", "", cfg=False, max_sequence_length=16)[0]
        first = W.encode(pipe, "a red fox", "", cfg=False, max_sequence_length=16)[0]
        second = W.encode(pipe, "a cat", "", cfg=False, max_sequence_length=16)[0]
    assert both.shape[1] == 2 * 77 + 16
    assert torch.equal(both[:, :77], first[:, :77]) and torch.equal(both[:, 77:154], second[:, :77])


def test_turned_off_it_is_the_pipeline_with_the_syntax_as_text(pipe):
    import torch

    with torch.no_grad():
        ref = pipe.encode_prompt("a (red:1.5) fox", None, None, negative_prompt="[x]", max_sequence_length=32)
        off = W.encode(pipe, "a (red:1.5) fox", "[x]", max_sequence_length=32, enabled=False)
        on = W.encode(pipe, "a (red:1.5) fox", "[x]", max_sequence_length=32)
    assert _equal(ref, off) and not _equal(ref, on)


def test_bad_options_are_refused(pipe):
    with pytest.raises(ValidationError) as e:
        W.encode(pipe, "a", "", emphasis="Loud")
    assert e.value.field == "emphasis"
    with pytest.raises(ValidationError) as e:
        W.encode(pipe, "a", "", max_sequence_length=513)
    assert e.value.field == "max_sequence_length"


def _image(pipe, embeds=None, prompt=None, negative=""):
    import numpy as np
    import torch

    kwargs = {"num_inference_steps": 3, "height": 128, "width": 128, "guidance_scale": 4.0,
              "generator": torch.Generator().manual_seed(3)}
    if embeds is None:
        kwargs.update(prompt=prompt, negative_prompt=negative)
    else:
        pe, npe, ppe, nppe = embeds
        kwargs.update(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                      negative_pooled_prompt_embeds=nppe)
    return np.asarray(pipe(**kwargs).images[0])


def test_images_plain_identical_weight_one_identical_weight_more_different(pipe):
    import numpy as np
    import torch

    today = _image(pipe, prompt="a red fox", negative="blurry")
    with torch.no_grad():
        plain = _image(pipe, W.encode(pipe, "a red fox", "blurry"))
        one = _image(pipe, W.encode(pipe, "a (red:1.0) fox", "blurry"))
        more = _image(pipe, W.encode(pipe, "a (red:1.5) fox", "blurry"))
    assert np.array_equal(today, plain) and np.array_equal(today, one)
    assert not np.array_equal(today, more)
