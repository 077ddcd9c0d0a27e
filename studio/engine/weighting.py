"""A1111 prompt weighting for SD3: ``(word:1.3)``, ``(word)``, ``[word]``, ``\\(`` escapes, ``BREAK``.

Parsing is A1111's ``parse_prompt_attention`` (``modules/prompt_parser.py``), to the float;
encoding is what Forge does for SD3 (``backend/text_processing``), shaped as
``StableDiffusion3Pipeline.encode_prompt`` returns it so the engine passes it as
``prompt_embeds=`` and the rest:

- **CLIP-L and CLIP-G**: the prompt's tokens (each fragment tokenized on its own, as A1111 does)
  are split into chunks of 75, each wrapped as ``[BOS] + 75 tokens + [EOS]`` and padded as the
  tokenizer pads; a chunk that fills up cuts after its last comma when that comma is within the
  last 20 tokens (A1111's "comma padding backtrack"); ``BREAK`` starts a new chunk. Each chunk is
  encoded on its own and the chunks are concatenated along the sequence (77·k tokens), as A1111
  does and SD3's joint attention accepts. The hidden states are the penultimate layer's, as the
  pipeline takes them.
- **T5** reads the whole prompt (fragments tokenized on their own, ``BREAK`` dropped: T5 has no
  chunks) up to ``max_sequence_length`` (≤ 512), with its EOS, padded as the pipeline pads.
- **The weights** multiply the encoders' output hidden states, token by token, and the mean of
  each encoded chunk is then restored (A1111's and Forge's default emphasis, "Original";
  ``emphasis="No norm"`` skips the restoring). We weight the hidden states, not the input token
  embeddings: that is what A1111 and Forge do for every model, SD3 included, and what sd_embed
  does for SD3 too (it scales CLIP's and T5's outputs, not their inputs). A weight on an input
  embedding is mixed away by the encoder's attention in ways no one has tuned; a weight on the
  output is exactly the emphasis SD3's transformer sees.
- **The pooled embedding** is CLIP's pooled output of the first chunk, computed from the tokens
  with the syntax removed and before any weight is applied (as Forge's ``zs[0].pooled``) — the
  "unweighted prompt". Pooled embeddings steer the whole image (SD3 adds them to the timestep
  embedding); scaling a token of them would scale everything.
- **Positive and negative** are padded to the same number of chunks with the encoding of an
  empty chunk (A1111's ``empty_chunk``, what its "pad prompt/negative prompt" option does), so
  CFG can batch them.

A prompt with no weighting syntax that fits in one chunk takes exactly the pipeline's tokens and
forward passes: its tensors are the pipeline's, bit for bit (tests/test_weighting.py). A longer
one gains chunks where the pipeline would truncate at 77 tokens. ``enabled=False`` turns parsing
off: the prompt is encoded by ``pipe.encode_prompt`` itself, syntax as literal text.

Not parsed (left as text): A1111's prompt editing ``[a:b:0.5]`` and alternation ``[a|b]`` (a
``[...]`` there is read as ÷1.1), ``AND`` (composable diffusion) and textual-inversion names.
"""

from __future__ import annotations

import re

CHUNK = 75  # tokens per CLIP chunk, BOS and EOS aside (A1111's chunk_length)
COMMA_BACKTRACK = 20  # A1111's default "Prompt word wrap length limit"
EMPHASIS = ("Original", "No norm")

# A1111 modules/prompt_parser.py, verbatim (with the whitespace-tolerant weight of 1.7+).
re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.VERBOSE)

re_break = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text):
    """
    Parses a string with attention tokens and returns a list of pairs: text and its associated weight.
    Accepted tokens are:
      (abc) - increases attention to abc by a multiplier of 1.1
      (abc:3.12) - increases attention to abc by a multiplier of 3.12
      [abc] - decreases attention to abc by a multiplier of 1.1
      \\( - literal character '('
      \\[ - literal character '['
      \\) - literal character ')'
      \\] - literal character ']'
      \\\\ - literal character '\\'
      anything else - just text

    A1111's function, line for line; ``BREAK`` comes back as ``["BREAK", -1]``.
    """

    res = []
    round_brackets = []
    square_brackets = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)

        if text.startswith('\\'):
            res.append([text[1:], 1.0])
        elif text == '(':
            round_brackets.append(len(res))
        elif text == '[':
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ')' and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == ']' and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)

    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)

    if len(res) == 0:
        res = [["", 1.0]]

    # merge runs of identical weights
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return res


def parse(text: str | None, enabled: bool = True) -> tuple[tuple[str, float], ...]:
    """The prompt as ``((text, weight), ...)``, hashable; ``("BREAK", -1)`` marks a BREAK.
    With ``enabled=False`` the whole text is one fragment of weight 1."""
    text = text or ""
    if not enabled:
        return ((text, 1.0),)
    return tuple((t, float(w)) for t, w in parse_prompt_attention(text))


def is_plain(text: str | None) -> bool:
    """True when the prompt has no weighting syntax: it parses back to itself at weight 1."""
    return parse(text) == ((text or "", 1.0),)


def cache_key(prompt, negative_prompt=None, prompt_3=None, negative_prompt_3=None, *,
              enabled: bool = True, emphasis: str = "Original") -> tuple:
    """What the prompt-embedding cache keys on: the parsed prompts (so ``(red:1.0) fox`` and
    ``red fox`` share an entry) and how they are encoded. Add the engine's own parts (text
    encoders, dtype, CFG, max_sequence_length, text-encoder LoRAs) around it."""
    def one(p):
        return None if p is None else parse(p, enabled)

    return ("weighting" if enabled else "plain", emphasis if enabled else None,
            one(prompt), one(negative_prompt), one(prompt_3), one(negative_prompt_3))


# ---------------------------------------------------------------------------------------------
# Tokens


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]


def clip_chunks(tokenizer, fragments, chunk: int = CHUNK, backtrack: int = COMMA_BACKTRACK):
    """A1111's ``tokenize_line``: the fragments' tokens in chunks of ``chunk`` (lists of
    ``(token_ids, multipliers, n_prompt_tokens)``), BOS/EOS not yet added. BREAK ends a chunk;
    a full chunk moves its tail after the last comma (within ``backtrack`` tokens) to the next."""
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [t for t, _ in fragments]
    tokenized = _ids(tokenizer, texts)
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal tokens, mults, last_comma
        chunks.append((tokens, mults))
        tokens, mults, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenized, fragments):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == chunk and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                cut = last_comma + 1
                moved, moved_m = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved, moved_m
            if len(tokens) == chunk:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def _wrap(tokenizer, ids: list[int], chunk: int = CHUNK) -> list[int]:
    """``[BOS] + ids + [EOS]``, padded to chunk + 2 as the tokenizer pads (EOS for CLIP-L,
    the pad token after the first EOS where they differ)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return [bos, *ids, eos] + [pad] * (chunk - len(ids))


def t5_ids(tokenizer, fragments, max_sequence_length: int) -> tuple[list[int], list[float], int]:
    """T5's ids for the fragments (BREAK dropped), truncated to ``max_sequence_length`` with its
    EOS kept last and padded, as the pipeline's tokenizer call does; plus the multipliers and the
    untruncated length (EOS included)."""
    pieces = [(t, w) for t, w in fragments if not (t == "BREAK" and w == -1)]
    ids: list[int] = []
    mults: list[float] = []
    for toks, (_, w) in zip(_ids(tokenizer, [t for t, _ in pieces]), pieces):
        ids += toks
        mults += [w] * len(toks)
    full = len(ids) + 1
    keep = max_sequence_length - 1
    ids, mults = ids[:keep] + [tokenizer.eos_token_id], mults[:keep] + [1.0]
    pad = max_sequence_length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, mults + [1.0] * pad, full


# ---------------------------------------------------------------------------------------------
# Encoding


def _emphasize(z, mults, emphasis: str):
    """A1111's ``EmphasisOriginal.after_transformers`` (or "No norm"), in float32."""
    import torch

    m = torch.tensor(mults, dtype=torch.float32, device=z.device)
    if bool((m == 1.0).all()):
        return z  # nothing weighted: the tensor as the encoder gave it
    zf = z.float()
    out = zf * m.reshape(m.shape + (1,))
    if emphasis == "Original":
        new_mean = out.mean()
        if torch.isfinite(new_mean) and new_mean.abs() > 1e-12:
            out = out * (zf.mean() / new_mean)
    return out.to(z.dtype)


def _encode_clip(pipe, index: int, chunks, device, emphasis: str):
    """One CLIP encoder over its chunks: (hidden states [1, 77·k, d], pooled [1, p]) — the
    pooled output of the first chunk, the hidden states of every chunk weighted."""
    import torch

    tokenizer = (pipe.tokenizer, pipe.tokenizer_2)[index]
    encoder = (pipe.text_encoder, pipe.text_encoder_2)[index]
    ids = torch.tensor([_wrap(tokenizer, t) for t, _ in chunks], dtype=torch.long)
    hidden, pooled = [], None
    for k in range(ids.shape[0]):  # one chunk a pass, as the pipeline's batch of one
        out = encoder(ids[k:k + 1].to(device), output_hidden_states=True)
        if pooled is None:
            pooled = out[0]
        z = out.hidden_states[-2].to(dtype=pipe.text_encoder.dtype, device=device)
        mults = [1.0, *chunks[k][1], *[1.0] * (CHUNK + 1 - len(chunks[k][1]))]  # BOS, tokens, EOS + padding
        hidden.append(_emphasize(z[0], mults, emphasis)[None])
    return torch.cat(hidden, dim=1), pooled


def _encode_t5(pipe, fragments, max_sequence_length: int, device, emphasis: str):
    import torch

    if pipe.text_encoder_3 is None:  # as the pipeline: zeros in T5's place
        return torch.zeros((1, max_sequence_length, pipe.transformer.config.joint_attention_dim),
                           device=device, dtype=pipe.text_encoder.dtype)
    ids, mults, _ = t5_ids(pipe.tokenizer_3, fragments, max_sequence_length)
    z = pipe.text_encoder_3(torch.tensor([ids], dtype=torch.long).to(device))[0]
    z = z.to(dtype=pipe.text_encoder_3.dtype, device=device)
    return _emphasize(z[0], mults, emphasis)[None]


def _pad_chunks(a, b):
    """Pad the shorter chunk list with empty chunks (A1111's empty_chunk)."""
    n = max(len(a), len(b))
    return a + [([], [])] * (n - len(a)), b + [([], [])] * (n - len(b))


def _side(pipe, clip_l, clip_g, t5_fragments, max_sequence_length, device, emphasis):
    import torch

    clip_l, clip_g = _pad_chunks(clip_l, clip_g)
    z_l, pooled_l = _encode_clip(pipe, 0, clip_l, device, emphasis)
    z_g, pooled_g = _encode_clip(pipe, 1, clip_g, device, emphasis)
    clip = torch.cat([z_l, z_g], dim=-1)
    t5 = _encode_t5(pipe, t5_fragments, max_sequence_length, device, emphasis)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)


def encode(pipe, prompt: str, negative_prompt: str | None = None, *, prompt_3: str | None = None,
           negative_prompt_3: str | None = None, cfg: bool = True, max_sequence_length: int = 256,
           enabled: bool = True, emphasis: str = "Original", device=None):
    """``(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)`` for one image, as
    ``pipe.encode_prompt`` returns them (negatives None without CFG); see the module docstring.

    ``prompt_3`` / ``negative_prompt_3``: what T5 reads instead of the prompt (diffusers' own
    parameters; None: the prompt). ``enabled=False``: no parsing, ``pipe.encode_prompt`` itself.
    Call under ``torch.no_grad()``."""
    if emphasis not in EMPHASIS:
        from studio.errors import ValidationError

        raise ValidationError(f"Unknown emphasis {emphasis!r}; choose one of: {', '.join(EMPHASIS)}.", "emphasis")
    if not 1 <= int(max_sequence_length) <= 512:
        from studio.errors import ValidationError

        raise ValidationError("Max sequence length must be between 1 and 512 T5 tokens.", "max_sequence_length")
    negative_prompt = negative_prompt or ""
    if not enabled:
        return pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=prompt_3, negative_prompt=negative_prompt if cfg else None,
            negative_prompt_3=negative_prompt_3 if cfg else None, do_classifier_free_guidance=cfg,
            num_images_per_prompt=1, max_sequence_length=max_sequence_length, device=device)
    device = device or pipe._execution_device
    pos = parse(prompt)
    pos_l = clip_chunks(pipe.tokenizer, pos)
    pos_g = clip_chunks(pipe.tokenizer_2, pos)
    pos_t5 = parse(prompt_3) if prompt_3 else pos
    if cfg:
        neg = parse(negative_prompt)
        neg_l = clip_chunks(pipe.tokenizer, neg)
        neg_g = clip_chunks(pipe.tokenizer_2, neg)
        pos_l, neg_l = _pad_chunks(pos_l, neg_l)
        pos_g, neg_g = _pad_chunks(pos_g, neg_g)
        neg_t5 = parse(negative_prompt_3) if negative_prompt_3 else neg
    pe, ppe = _side(pipe, pos_l, pos_g, pos_t5, max_sequence_length, device, emphasis)
    if not cfg:
        return pe, None, ppe, None
    npe, nppe = _side(pipe, neg_l, neg_g, neg_t5, max_sequence_length, device, emphasis)
    return pe, npe, ppe, nppe
