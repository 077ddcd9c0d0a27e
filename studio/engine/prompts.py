"""Prompts: what the text encoders will read of them, and a cache of their embeddings."""

from __future__ import annotations

import threading

from studio.catalog import MAX_T5_TOKENS

CLIP_TOKENS = 77


def token_notes(pipe, prompt: str, max_sequence_length: int) -> list[str]:
    """Say when the text encoders will not see the whole prompt."""
    notes = []
    if not prompt:
        return notes
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None:
        n = len(tok(prompt, truncation=False, add_special_tokens=True).input_ids)
        if n > CLIP_TOKENS:
            notes.append(
                f"The prompt is {n} CLIP tokens; the CLIP encoders read only the first {CLIP_TOKENS} "
                f"(T5 reads up to {max_sequence_length})."
            )
    t5 = getattr(pipe, "tokenizer_3", None)
    if t5 is not None and getattr(pipe, "text_encoder_3", None) is not None:
        n = len(t5(prompt, truncation=False, add_special_tokens=True).input_ids)
        if n > max_sequence_length:
            more = (f"; raise max sequence length (up to {MAX_T5_TOKENS})"
                    if max_sequence_length < MAX_T5_TOKENS else "")
            notes.append(f"The prompt is {n} T5 tokens; T5 reads only the first {max_sequence_length}{more}.")
    return notes



class PromptCache:
    """A bounded LRU of prompt embeddings keyed by (prompt, negative, text encoders, length, CFG).

    A hit skips all three text encoders — under offload presets that also saves moving T5 to the
    GPU for every image. Entries live on the CPU (a few MB each for the real models).
    """

    def __init__(self, max_entries: int = 16):
        from collections import OrderedDict

        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        """The cached embeddings of ``key`` (marked most recent; counted as a hit), or None (a miss)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        """Cache ``value`` under ``key``, dropping the least recently used entries past ``max_entries``."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts stay)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


