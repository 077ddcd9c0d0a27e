"""Live token counts for the prompt boxes: what CLIP and T5 will read, and what they will not.

Computed from the pipeline's own tokenizers (no text encoder runs: the UI calls this on every
keystroke), on the prompt as the encoder will see it — weighting syntax removed and ``BREAK``
honoured when weighting is on (:mod:`studio.engine.weighting`), the literal text when it is off.

- **CLIP**: with weighting on, the prompt is read in 75-token chunks (none is cut); the count is
  A1111's — every chunk but the last counts its full 75, so ``BREAK`` shows what it costs — shown
  as ``used/75·chunks`` ("80/150"). With weighting off, CLIP reads the first 75 tokens and the
  rest is cut, as diffusers' pipeline does.
- **T5** reads up to ``max_sequence_length`` tokens, its end-of-text token included; the words
  past that are cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.engine.weighting import CHUNK, clip_chunks, parse


@dataclass(frozen=True)
class TokenCount:
    """What CLIP and T5 will read of one prompt, and the text each will not."""
    clip_tokens: int  # prompt tokens CLIP reads (BOS/EOS not counted)
    clip_used: int  # A1111's count: 75 per chunk before the last, plus the last chunk's tokens
    clip_chunks: int  # 75-token chunks (CLIP sees 77·chunks tokens)
    clip_truncated: str  # the text CLIP will not read ("" when none)
    t5_tokens: int  # T5 tokens for the prompt, EOS included (before the limit)
    t5_limit: int  # max_sequence_length
    t5_truncated: str  # the text T5 will not read ("" when none, or no T5)
    has_t5: bool = True

    @property
    def clip_limit(self) -> int:
        """The CLIP tokens the chunks hold, 75 each (the denominator of ``used/75·chunks``)."""
        return CHUNK * self.clip_chunks

    def notes(self) -> list[str]:
        """What a request's notes should say before it runs: what each encoder will not read."""
        out = []
        if self.clip_truncated:
            out.append(f"CLIP reads the first {CHUNK} tokens of the prompt; it will not see: "
                       f"{_short(self.clip_truncated)!r} (turn prompt weighting on to read it in chunks).")
        if self.t5_truncated:
            more = "; raise max sequence length (up to 512)" if self.t5_limit < 512 else ""
            out.append(f"The prompt is {self.t5_tokens} T5 tokens; T5 reads {self.t5_limit} and will not see: "
                       f"{_short(self.t5_truncated)!r}{more}.")
        return out

    def text(self) -> str:
        """One line for under the prompt box, e.g. ``CLIP 80/150 (2 chunks) · T5 93/256``."""
        chunks = f" ({self.clip_chunks} chunks)" if self.clip_chunks > 1 else ""
        clip = f"CLIP {self.clip_used}/{self.clip_limit}{chunks}"
        if self.clip_truncated:
            clip += " — cut: " + _short(self.clip_truncated)
        if not self.has_t5:
            return clip + " · T5 off"
        t5 = f"T5 {min(self.t5_tokens, self.t5_limit)}/{self.t5_limit}"
        if self.t5_truncated:
            t5 += " — cut: " + _short(self.t5_truncated)
        return f"{clip} · {t5}"


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def count(tokenizer, tokenizer_3, prompt: str | None, max_sequence_length: int = 256, *,
          prompt_3: str | None = None, enabled: bool = True) -> TokenCount:
    """Token counts for ``prompt`` with CLIP's ``tokenizer`` and T5's ``tokenizer_3`` (None: no
    T5 loaded). ``prompt_3``: what T5 reads instead of the prompt. ``enabled``: weighting on."""
    prompt = prompt or ""
    fragments = parse(prompt, enabled)
    if enabled:
        chunks = clip_chunks(tokenizer, fragments)
        n_tokens = sum(len(t) for t, _ in chunks)
        used = CHUNK * (len(chunks) - 1) + len(chunks[-1][0])
        clip = (n_tokens, used, len(chunks), "")
    else:
        ids = tokenizer(prompt, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
        cut = tokenizer.decode(ids[CHUNK:]) if len(ids) > CHUNK else ""
        clip = (min(len(ids), CHUNK), min(len(ids), CHUNK), 1, cut)
    if tokenizer_3 is None:
        return TokenCount(*clip, 0, max_sequence_length, "", has_t5=False)
    t5_fragments = parse(prompt_3, enabled) if prompt_3 else fragments
    pieces = [t for t, w in t5_fragments if not (t == "BREAK" and w == -1)]
    ids: list[int] = []
    for toks in (tokenizer_3(pieces, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
                 if pieces else []):
        ids += toks
    keep = max_sequence_length - 1  # the EOS takes the last place
    cut = tokenizer_3.decode(ids[keep:]) if len(ids) > keep else ""
    return TokenCount(*clip, len(ids) + 1, max_sequence_length, cut)


def count_for(pipe, prompt: str | None, max_sequence_length: int = 256, **kwargs) -> TokenCount:
    """:func:`count` with a loaded pipeline's tokenizers (T5 counted only when T5 is loaded)."""
    t5 = pipe.tokenizer_3 if getattr(pipe, "text_encoder_3", None) is not None else None
    return count(pipe.tokenizer, t5, prompt, max_sequence_length, **kwargs)
