"""Step caching (studio.engine.stepcache) on the tiny SD3 family: off is exact and leaves nothing
behind, on skips transformer blocks (counted by forward hooks), SLG and ControlNet are handled."""

import numpy as np
import pytest
import torch

from studio.engine.stepcache import SPEED_MODES, SPEED_THRESHOLDS, StepCache, step_cache, threshold_for
from studio.errors import ValidationError

PROMPT = "a red circle on a blue background"
FORCE = 0.9  # a threshold the tiny random model passes on almost every step


@pytest.fixture(scope="module")
def pipe(tiny_family):
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(str(tiny_family["sd3.5-medium"]))
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, steps=8, size=128, **kw):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=4.5, height=size, width=size,
                generator=torch.Generator().manual_seed(1), output_type="np", **kw).images[0]


class Counter:
    """Counts forward calls of a module (a plain torch hook, independent of the cache's)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))

    def close(self):
        self.handle.remove()


def _block_state(transformer):
    return [(sorted(b.__dict__.get("_diffusers_hook").hooks) if "_diffusers_hook" in b.__dict__ else None,
             "forward" in b.__dict__, len(b._forward_hooks), len(b._forward_pre_hooks))
            for b in transformer.transformer_blocks]


def test_speed_settings_are_stated():
    assert SPEED_MODES == ("off", "fast", "faster")
    assert threshold_for("off") is None and threshold_for(None) is None
    assert 0 < SPEED_THRESHOLDS["fast"] < SPEED_THRESHOLDS["faster"] < 1
    assert threshold_for("fast") == SPEED_THRESHOLDS["fast"] and threshold_for(0.3) == 0.3
    with pytest.raises(ValidationError, match="choose one of off, fast, faster") as e:
        threshold_for("turbo")
    assert e.value.field == "speed"
    with pytest.raises(ValidationError, match="between 0 and 1"):
        threshold_for(1.5)


def test_off_is_exact_and_a_cached_run_leaves_nothing_behind(pipe):
    t = pipe.transformer
    before = _block_state(t)
    hooks = (len(t._forward_hooks), len(t._forward_pre_hooks))
    reference = generate(pipe)
    with step_cache(t, "off") as off:
        assert np.array_equal(generate(pipe), reference)
    assert off.stats.passes == 0  # off installs nothing
    with StepCache(t, FORCE) as cache:
        assert _block_state(t) != before  # hooks are on while it runs
        cached = generate(pipe)
    assert cache.stats.skipped > 0 and not np.array_equal(cached, reference)
    assert _block_state(t) == before and (len(t._forward_hooks), len(t._forward_pre_hooks)) == hooks
    assert np.array_equal(generate(pipe), reference)  # bit-identical after a cached run


def test_on_skips_the_blocks_of_cached_steps(pipe):
    t = pipe.transformer
    head, tail = StepCache.span(t)
    assert (head, tail) == (0, len(t.transformer_blocks) - 2)  # the last block is context_pre_only
    # a block's own __call__ still happens on a cached step (the hook returns its input); its
    # feed-forward only runs when the block computes
    passes, middle, last = Counter(t), Counter(t.transformer_blocks[1].ff), Counter(t.transformer_blocks[-1].ff)
    try:
        generate(pipe, steps=8)
        assert (passes.n, middle.n, last.n) == (8, 8, 8)
        passes.n = middle.n = last.n = 0
        with StepCache(t, FORCE) as cache:
            generate(pipe, steps=8)
        stats = cache.stats
        assert passes.n == 8 == stats.passes and stats.computed["cond"] + stats.cached["cond"] == 8
        assert stats.skipped >= 4 and 0 < stats.skipped_fraction < 1
        assert middle.n == stats.computed["cond"] < 8  # cached steps never ran the middle blocks
        assert last.n == 8  # the context_pre_only block always runs
        assert stats.as_meta() == {"passes": 8, "cached": stats.skipped}
    finally:
        for c in (passes, middle, last):
            c.close()


def test_each_run_starts_a_fresh_history(pipe):
    """Two images inside one StepCache: the second does not reuse the first's residuals."""
    t = pipe.transformer
    with StepCache(t, FORCE):
        first = generate(pipe)
        second = generate(pipe)
    assert np.array_equal(first, second)


def test_skip_layer_guidance_passes_always_compute(pipe):
    t = pipe.transformer
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    with StepCache(t, FORCE, skip_layers=[1]) as cache:
        generate(pipe, steps=8, **slg)
    stats = cache.stats
    assert stats.computed.get("slg", 0) >= 6 and "slg" not in stats.cached
    assert stats.cached.get("cond", 0) > 0
    with pytest.raises(ValidationError, match="Skip Layer Guidance skips block 0"):
        with StepCache(t, "fast", skip_layers=[0, 1]):
            pass
    assert StepCache.problem(t, skip_layers=[StepCache.span(t)[1]])


def test_group_offloaded_transformers_are_refused(pipe):
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    block = pipe.transformer.transformer_blocks[1]
    HookRegistry.check_if_exists_or_initialize(block).register_hook(ModelHook(), "group_offloading")
    try:
        with pytest.raises(ValidationError, match="group offload") as e:
            with StepCache(pipe.transformer, "fast"):
                pass
        assert e.value.field == "speed"
    finally:
        block._diffusers_hook.remove_hook("group_offloading", recurse=False)
        del block._diffusers_hook
        block.__dict__.pop("forward", None)


def _controlnet(transformer):
    from diffusers import SD3ControlNetModel

    torch.manual_seed(0)
    net = SD3ControlNetModel.from_transformer(transformer, num_layers=2, num_extra_conditioning_channels=0)
    with torch.no_grad():
        for block in net.controlnet_blocks:  # zero-initialised: give the residuals a real effect
            block.weight.normal_(0, 0.2)
    return net


def test_controlnet_residuals_count_once_on_a_cached_step(pipe, monkeypatch):
    """SD3 adds ControlNet residuals between blocks: on a cached step the reused residual already
    holds them, and adding this step's again would count them twice. Two transformer calls with
    the same inputs (the second at a hair lower timestep, so it is cached): with the cache's
    residual list the cached output is the computed one; with a plain list it is not."""
    from studio.engine import stepcache

    t = pipe.transformer
    torch.manual_seed(2)
    cfg = t.config
    x = torch.randn(2, cfg.in_channels, 16, 16)
    enc = torch.randn(2, 12, cfg.joint_attention_dim)
    pooled = torch.randn(2, cfg.pooled_projection_dim)
    control = [torch.randn(2, 64, cfg.num_attention_heads * cfg.attention_head_dim) for _ in range(2)]

    def two_steps():
        outs = []
        with StepCache(t, 0.5) as cache, torch.no_grad():
            for step in (500.0, 499.99):
                outs.append(t(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                              timestep=torch.tensor([step, step]), block_controlnet_hidden_states=control,
                              return_dict=False)[0])
        assert cache.stats.computed == {"cond": 1} and cache.stats.cached == {"cond": 1}
        return (outs[1] - outs[0]).abs().mean() / outs[0].abs().mean()

    once = two_steps()
    monkeypatch.setattr(stepcache, "_ControlResiduals", lambda items, *a: list(items))
    twice = two_steps()
    assert once < 1e-3 and twice > 100 * once, (float(once), float(twice))


def test_controlnet_pipeline_runs_cached_and_stays_conditioned(pipe):
    from diffusers import StableDiffusion3ControlNetPipeline

    cpipe = StableDiffusion3ControlNetPipeline(**pipe.components, controlnet=_controlnet(pipe.transformer))
    cpipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 128, 128) * 2 - 1

    def run(scale):
        with StepCache(cpipe.transformer, FORCE) as cache:
            out = cpipe(PROMPT, num_inference_steps=8, guidance_scale=4.5, height=128, width=128,
                        control_image=control, controlnet_conditioning_scale=scale,
                        generator=torch.Generator().manual_seed(1), output_type="latent").images
        assert cache.stats.skipped >= 4
        return out

    assert (run(1.0) - run(0.0)).abs().mean() > 0.1  # the control still conditions the image
