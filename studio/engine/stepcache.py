"""Step caching for SD3 (the "Speed" setting): on a step where the transformer's first block
changes its output little since the last computed step, the remaining blocks are skipped and the
last computed step's residual is reused — First Block Cache, through diffusers' own hooks
(``diffusers.hooks.apply_first_block_cache``; ``JointTransformerBlock`` is in its block registry).

Speed settings (``SPEED_MODES``), the FBC threshold each one uses (``SPEED_THRESHOLDS``: the
relative mean change of the first block's residual below which a step is cached):

    off     exact: every step runs every block (the default, so a seed reproduces bit for bit)
    fast    threshold 0.12 — on the trained demo model at 28 steps about 40 % of the passes cached
    faster  threshold 0.25 — more passes cached, visibly softer detail

(measured by ``python -m studio.bench --only stepcache``; the README's "Speed" section has the
numbers). Why ``apply_first_block_cache`` itself is not called, and what the wrapper adds:

* SD3's last block is ``context_pre_only``: it returns no text stream, and diffusers' tail hook
  subtracts from it (``TypeError: None - Tensor``). The cache's span ends at the last block that
  returns both streams (the one before the last in SD3); the last block always runs. The hooks are
  diffusers' own (``FBCHeadBlockHook`` / ``FBCBlockHook``), placed by its own helpers.

* SD3's pipelines set no cache context and ``SD3Transformer2DModel`` has no ``CacheMixin``, so the
  hooks' state manager raises "No cache context is set". A forward pre-hook on the transformer sets
  one for every call and a forward hook clears it and counts the pass as computed or cached. Plain torch hooks: model offload, which
  re-installs accelerate's hooks on the transformer after every image, leaves them alone.
* ControlNet: SD3's transformer adds the ControlNet residuals *between* blocks, outside them. On a
  cached step the reused residual already carries the last computed step's ControlNet residuals,
  and the forward would add this step's on top — the conditioning would count twice. The pre-hook
  hands the forward a residual list that reads 0 on cached steps for the blocks inside the cached
  span (the residual after the span's last block is still added: the cached residual was measured
  before it).
* Skip Layer Guidance's extra pass runs fewer layers at another batch size: each such pass gets a
  fresh context, so it always computes and never disturbs the denoising pass's history. SLG
  layers that include the span's first or last block are refused (the hooks need both to run).

Per generation: ``with StepCache(pipe.transformer, "fast") as cache: pipe(...)`` installs the hooks
on entry and removes them on exit, restoring every block as it was (several pipeline calls inside
one ``with`` are fine: a timestep that does not decrease starts a fresh history): the transformer is shared and
cached between variants and generations, and with speed off nothing of a cached run remains
(tests/test_stepcache.py checks the next image is bit-identical). ``cache.stats`` says how many
passes were computed and cached.

Refused (``StepCache.problem``): a group-offloaded transformer — group offload's prefetch follows
the order blocks ran in on the first step, and cached steps do not run them (unverified on a GPU,
so refused until ``python -m studio.bench_gpu`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.errors import ValidationError

SPEED_MODES = ("off", "fast", "faster")
SPEED_DEFAULT = "off"
SPEED_THRESHOLDS = {"fast": 0.12, "faster": 0.25}
SPEED_HELP = {
    "off": "every step runs the whole transformer: exact, reproducible",
    "fast": f"First Block Cache, threshold {SPEED_THRESHOLDS['fast']}: skips steps that change little",
    "faster": f"First Block Cache, threshold {SPEED_THRESHOLDS['faster']}: skips more, softer detail",
}
_FBC_HOOKS = ("fbc_leader_block_hook", "fbc_block_hook")  # diffusers.hooks.first_block_cache names
_GROUP_OFFLOAD_HOOK = "group_offloading"  # diffusers.hooks.group_offloading._GROUP_OFFLOADING


def threshold_for(speed: str | float | None) -> float | None:
    """The FBC threshold of a speed setting (None: off). A number is taken as the threshold."""
    if speed is None or speed == "off":
        return None
    if isinstance(speed, (int, float)) and not isinstance(speed, bool):
        if not 0 < float(speed) < 1:
            raise ValidationError(f"A step-cache threshold must be between 0 and 1, not {speed}.", "speed")
        return float(speed)
    if speed not in SPEED_THRESHOLDS:
        raise ValidationError(f"Unknown speed {str(speed)[:40]!r}: choose one of {', '.join(SPEED_MODES)}.", "speed")
    return SPEED_THRESHOLDS[speed]


@dataclass
class StepCacheStats:
    """Transformer passes of one cached generation, per context ("cond", "slg")."""

    computed: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)

    @property
    def passes(self) -> int:
        """Transformer passes asked for, computed and cached together."""
        return sum(self.computed.values()) + sum(self.cached.values())

    @property
    def skipped(self) -> int:
        """Passes answered from the cache."""
        return sum(self.cached.values())

    @property
    def skipped_fraction(self) -> float:
        """The share of passes answered from the cache (0 with no passes)."""
        return self.skipped / self.passes if self.passes else 0.0

    def as_meta(self) -> dict:
        """The counts for an image's metadata: ``passes`` and ``cached``."""
        return {"passes": self.passes, "cached": self.skipped}


class _ControlResiduals(list):
    """ControlNet residuals that read 0 while the current step is cached, after every block inside
    the cached span but its last (see the module doc). SD3's forward reads one entry after each
    block that is not ``context_pre_only``, in block order."""

    def __init__(self, items, cached, reader_blocks: list[int], tail: int):
        super().__init__(items)
        self._cached = cached
        self._readers = reader_blocks
        self._tail = tail
        self._read = 0

    def __getitem__(self, index):
        block = self._readers[min(self._read, len(self._readers) - 1)]
        self._read += 1
        if block < self._tail and self._cached():
            return 0
        return super().__getitem__(index)


class StepCache:
    """First Block Cache on ``transformer`` for the duration of a ``with`` block.

    ``speed``: "off" (does nothing), "fast", "faster" or a threshold in (0, 1). Raises
    ValidationError (field "speed") on entry when the transformer cannot be cached (see
    ``problem``)."""

    def __init__(self, transformer, speed: str | float | None = "fast", skip_layers=None):
        self.transformer = transformer
        self.speed = speed
        self.threshold = threshold_for(speed)
        self.skip_layers = list(skip_layers or [])
        self.stats = StepCacheStats()
        self._active = False

    @staticmethod
    def span(transformer) -> tuple[int, int]:
        """(first, last) block of the cached span: from block 0 to the last block that returns
        both streams."""
        blocks = transformer.transformer_blocks
        both = [i for i, b in enumerate(blocks) if not getattr(b, "context_pre_only", False)]
        return 0, (both[-1] if both else len(blocks) - 1)

    @classmethod
    def problem(cls, transformer, skip_layers=None) -> str | None:
        """Why step caching cannot run on ``transformer`` (None when it can); ``skip_layers``:
        the request's Skip Layer Guidance layers."""
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None or len(blocks) < 2 or cls.span(transformer)[1] < 1:
            return "step caching needs a transformer with at least two blocks that return both streams."
        head, tail = cls.span(transformer)
        clash = sorted({head, tail} & set(skip_layers or []))
        if clash:
            return (f"Skip Layer Guidance skips block {clash[0]}, which the step cache needs to run: leave that "
                    f"layer out of the SLG layers, or set Speed to off.")
        for block in blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_GROUP_OFFLOAD_HOOK) is not None:
                return ("step caching is not combined with group offload (its prefetch follows the order "
                        "blocks ran in, and cached steps skip them): set Speed to off, or pick a preset "
                        "without group offload.")
            if registry is not None and any(registry.get_hook(h) is not None for h in _FBC_HOOKS):
                return "this transformer already has a step cache (a nested or leaked StepCache)."
        return None

    def __enter__(self) -> StepCache:
        if self.threshold is None:
            return self
        problem = self.problem(self.transformer, self.skip_layers)
        if problem:
            raise ValidationError(f"Speed {self.speed!r}: {problem}", "speed")
        from diffusers.hooks.first_block_cache import (
            FBCSharedBlockState,
            _apply_fbc_block_hook,
            _apply_fbc_head_block_hook,
        )
        from diffusers.hooks.hooks import StateManager

        blocks = list(self.transformer.transformer_blocks)
        head, tail = self.span(self.transformer)
        self._tail = tail
        self._readers = [i for i, b in enumerate(blocks) if not getattr(b, "context_pre_only", False)]
        self._before = [("_diffusers_hook" in b.__dict__, "forward" in b.__dict__) for b in blocks]
        self._state_manager = StateManager(FBCSharedBlockState, (), {})
        _apply_fbc_head_block_hook(blocks[head], self._state_manager, self.threshold)
        for block in blocks[head + 1:tail]:
            _apply_fbc_block_hook(block, self._state_manager)
        _apply_fbc_block_hook(blocks[tail], self._state_manager, is_tail=True)
        self._context = None
        self._slg_calls = 0
        self._last_t: dict[str, float] = {}
        t = self.transformer
        self._handles = [t.register_forward_pre_hook(self._pre, with_kwargs=True),
                         t.register_forward_hook(self._post, with_kwargs=True)]
        self._invalidate()
        self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        if not self._active:
            return False
        for handle in self._handles:
            handle.remove()
        self._state_manager.reset()
        for block, (had_registry, had_forward) in zip(self.transformer.transformer_blocks, self._before):
            registry = block.__dict__.get("_diffusers_hook")
            if registry is None:
                continue
            for name in _FBC_HOOKS:
                registry.remove_hook(name, recurse=False)
            if not had_registry and not registry.hooks:  # leave the block exactly as it was
                del block._diffusers_hook
                if not had_forward:
                    block.__dict__.pop("forward", None)
        self._invalidate()
        self._active = False
        return False

    def _invalidate(self) -> None:
        registry = getattr(self.transformer, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    # -- the hooks on the transformer
    def _pre(self, module, args, kwargs):
        from diffusers.hooks.hooks import CacheContext

        if kwargs.get("skip_layers"):  # SLG's extra pass: a fresh history each time, so it always computes
            self._slg_calls += 1
            self._state_manager._state_cache.pop(self._context, None) if self._context else None
            self._context = name = f"slg-{self._slg_calls}"
            self._state_manager.set_context(CacheContext(name))
            return None
        self._context = name = "cond"
        t = kwargs.get("timestep")
        if t is not None and hasattr(t, "flatten"):
            t = float(t.flatten()[0])
            if name in self._last_t and t >= self._last_t[name]:  # a new denoising run: fresh history
                self._state_manager._state_cache.pop(name, None)
            self._last_t[name] = t
        self._state_manager.set_context(CacheContext(name))
        residuals = kwargs.get("block_controlnet_hidden_states")
        if residuals is not None:
            wrapped = _ControlResiduals(residuals, self._cached, self._readers, self._tail)
            kwargs = {**kwargs, "block_controlnet_hidden_states": wrapped}
        return args, kwargs

    def _cached(self) -> bool:
        return not self._state_manager.get_state().should_compute

    def _post(self, module, args, kwargs, output):
        kind = "slg" if self._context.startswith("slg") else self._context
        table = self.stats.cached if self._cached() else self.stats.computed
        table[kind] = table.get(kind, 0) + 1
        if kind == "slg":
            self._state_manager._state_cache.pop(self._context, None)
        self._state_manager.set_context(None)
        return None


def step_cache(transformer, speed: str | float | None, skip_layers=None) -> StepCache:
    """``StepCache(transformer, speed, skip_layers)``: does nothing when ``speed`` is "off" or None."""
    return StepCache(transformer, speed, skip_layers)
