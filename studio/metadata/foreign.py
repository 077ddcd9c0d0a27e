"""Foreign metadata: InvokeAI's ``invokeai_metadata`` and ComfyUI's ``prompt`` / ``workflow``
graphs, read into studio field names. Bounded (node counts, link depth) and never trusting:
whatever comes out is cleaned by the schema before anyone uses it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from studio.metadata.infotext import guess_variant

# --- InvokeAI ---------------------------------------------------------------------------------


def invokeai_fields(data: dict) -> dict[str, Any]:
    """InvokeAI's ``invokeai_metadata`` chunk → studio fields (prompts, seed, steps, CFG, size,
    scheduler, strength, model and its variant, mode); unreadable values are left out."""
    fields: dict[str, Any] = {}
    for src, dst, kind in (
        ("positive_prompt", "prompt", str),
        ("negative_prompt", "negative_prompt", str),
        ("seed", "seed", int),
        ("steps", "steps", int),
        ("cfg_scale", "guidance", float),
        ("width", "width", int),
        ("height", "height", int),
        ("scheduler", "scheduler", str),
        ("strength", "strength", float),
    ):
        if data.get(src) is not None:
            try:
                fields[dst] = kind(data[src])
            except (TypeError, ValueError, OverflowError):
                pass
    model = data.get("model")
    name = None
    if isinstance(model, dict):
        name = model.get("name") or model.get("model_name") or model.get("key")
    elif isinstance(model, str):
        name = model
    if name:
        fields["model"] = str(name)
        if v := guess_variant(str(name)):
            fields["variant"] = v
    mode = str(data.get("generation_mode") or "")
    if "img2img" in mode or fields.get("strength") is not None and "txt2img" not in mode:
        fields["mode"] = "img2img"
    elif mode:
        fields["mode"] = "txt2img"
    return fields


def invokeai_legacy_fields(data: dict) -> dict[str, Any]:
    """Older InvokeAI's ``sd-metadata`` chunk (an ``image`` dict and ``model_weights``) → studio fields."""
    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    prompt = image.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = prompt[0].get("prompt")
    fields = invokeai_fields({
        "positive_prompt": prompt if isinstance(prompt, str) else None,
        "seed": image.get("seed"), "steps": image.get("steps"), "cfg_scale": image.get("cfg_scale"),
        "width": image.get("width"), "height": image.get("height"),
        "scheduler": image.get("sampler"), "model": data.get("model_weights"),
    })
    return fields


# --- ComfyUI ----------------------------------------------------------------------------------

_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
# widgets_values order of common nodes, to read a UI workflow when the API prompt is missing
_WIDGETS = {
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": ["add_noise", "noise_seed", None, "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"],
    "CLIPTextEncode": ["text"],
    "CLIPTextEncodeSD3": ["clip_l", "clip_g", "t5xxl", "empty_padding"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "ModelSamplingSD3": ["shift"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "RandomNoise": ["noise_seed", None],
    "CFGGuider": ["cfg"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "KSamplerSelect": ["sampler_name"],
    # comfy_extras/nodes_custom_sampler.py: add_noise, noise_seed (+ its control combo), cfg
    "SamplerCustom": ["add_noise", "noise_seed", None, "cfg"],
    "SamplerCustomAdvanced": [],
    # comfy_extras/nodes_sd3.py / nodes_slg.py
    "SkipLayerGuidanceSD3": ["layers", "scale", "start_percent", "end_percent"],
    "SkipLayerGuidanceDiT": ["double_layers", "single_layers", "scale", "start_percent", "end_percent",
                             "rescaling_scale"],
    "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"],
    # ControlNet (comfy nodes.py, comfy_extras/nodes_sd3.py, nodes_canny.py)
    "ControlNetLoader": ["control_net_name"],
    "ControlNetApply": ["strength"],
    "ControlNetApplyAdvanced": ["strength", "start_percent", "end_percent"],
    "ControlNetApplySD3": ["strength", "start_percent", "end_percent"],
    "Canny": ["low_threshold", "high_threshold"],
}
_MAX_NODES = 5000


def _workflow_to_prompt(workflow: dict) -> dict[str, dict]:
    """A ComfyUI UI workflow -> the API "prompt" shape, for the nodes we know."""
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 5:
            links[link[0]] = [str(link[1]), link[2]]
    graph: dict[str, dict] = {}
    for node in (workflow.get("nodes") or [])[:_MAX_NODES]:
        if not isinstance(node, dict):
            continue
        ctype = str(node.get("type", ""))
        inputs: dict[str, Any] = {}
        widgets = node.get("widgets_values")
        if isinstance(widgets, list):
            for name, value in zip(_WIDGETS.get(ctype, []), widgets):
                if name:
                    inputs[name] = value
        for inp in node.get("inputs") or []:
            if isinstance(inp, dict) and inp.get("link") in links:
                inputs[str(inp.get("name"))] = links[inp["link"]]
        graph[str(node.get("id"))] = {"class_type": ctype, "inputs": inputs}
    return graph


def _is_link(graph: dict, value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            and str(value[0]) in graph)


def _resolve(graph: dict, value: Any, depth: int = 0) -> Any:
    """A widget value, following links to primitive nodes (Primitive, Int, String...)."""
    if not _is_link(graph, value):
        return value
    if depth > 20:
        return None
    inputs = graph[str(value[0])].get("inputs") or {}
    for name in ("value", "text", "string", "seed", "noise_seed", "int", "float", "number"):
        if name in inputs:
            return _resolve(graph, inputs[name], depth + 1)
    return None


def _upstream(graph: dict, start: Any, stop: Callable[[dict], bool], skip=("clip", "vae")):
    """Nodes reachable upstream from a link, breadth first, not going past ``stop`` nodes."""
    if not _is_link(graph, start):
        return
    queue, seen = [str(start[0])], set()
    while queue and len(seen) < _MAX_NODES:
        nid = queue.pop(0)
        if nid in seen:
            continue
        seen.add(nid)
        node = graph[nid]
        yield node
        if stop(node):
            continue
        for name, value in (node.get("inputs") or {}).items():
            if name not in skip and _is_link(graph, value):
                queue.append(str(value[0]))


def _find_input(graph: dict, node: dict, names: tuple[str, ...], via: tuple[str, ...]) -> Any:
    """An input of ``node`` or of the nodes linked from its ``via`` inputs (guider, sigmas...)."""
    inputs = node.get("inputs") or {}
    for name in names:
        if name in inputs and not (_is_link(graph, inputs[name]) and _resolve(graph, inputs[name]) is None):
            return _resolve(graph, inputs[name])
    for v in via:
        if _is_link(graph, inputs.get(v)):
            found = _find_input(graph, graph[str(inputs[v][0])], names, ())
            if found is not None:
                return found
    return None


def _cond_text(graph: dict, link: Any) -> str | None:
    def is_encoder(node: dict) -> bool:
        return "CLIPTextEncode" in str(node.get("class_type")) or node.get("class_type") == "ConditioningZeroOut"

    texts: list[str] = []
    empty = False  # an encoder (or a zeroed conditioning) was found, with no text: the prompt is ""
    for node in _upstream(graph, link, is_encoder):
        ctype = str(node.get("class_type"))
        if ctype == "ConditioningZeroOut":
            empty = True
            continue
        if "CLIPTextEncode" not in ctype:
            continue
        inputs = node.get("inputs") or {}
        # CLIPTextEncodeSD3 has one text per encoder; the studio has one prompt: T5's, else CLIP-G's...
        for name in ("text", "t5xxl", "clip_g", "clip_l"):
            text = _resolve(graph, inputs.get(name))
            if isinstance(text, str) and text.strip():
                texts.append(text)
                break
            if isinstance(text, str):
                empty = True
    if texts:
        return "\n".join(dict.fromkeys(texts))
    return "" if empty else None


def _layers(value: Any) -> list[int] | None:
    """ComfyUI's SLG layer list: the text "7, 8, 9" (it runs ``int()`` on each part)."""
    if isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return value
    if not isinstance(value, str):
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        return None


def comfyui_fields(prompt_text: str | None, workflow_text: str | None) -> dict[str, Any]:
    """Recover generation fields from ComfyUI's ``prompt`` (API graph) or ``workflow`` chunk."""
    graph = None
    if prompt_text:
        data = json.loads(prompt_text)
        if isinstance(data, dict) and all(isinstance(n, dict) for n in data.values()):
            graph = {str(k): v for k, v in data.items()}
    if graph is None and workflow_text:
        data = json.loads(workflow_text)
        if not isinstance(data, dict):
            raise ValueError("the workflow is not a JSON object")
        graph = _workflow_to_prompt(data)
    if graph is None:
        raise ValueError("no ComfyUI graph found")
    samplers = [n for n in graph.values() if n.get("class_type") in _SAMPLERS]
    if not samplers:
        return {}

    def starts_from_empty(node: dict) -> bool:
        for n in _upstream(graph, (node.get("inputs") or {}).get("latent_image"), lambda _n: False):
            if str(n.get("class_type", "")).startswith("Empty"):
                return True
        return False

    sampler = next((s for s in samplers if starts_from_empty(s)), samplers[0])
    fields: dict[str, Any] = {}
    via = ("guider", "sigmas", "noise", "sampler")

    def put(name: str, value: Any, kind: type) -> None:
        if value is None or isinstance(value, (list, dict)):
            return
        try:
            fields[name] = kind(value)
        except (TypeError, ValueError, OverflowError):
            pass

    put("seed", _find_input(graph, sampler, ("seed", "noise_seed"), via), int)
    put("steps", _find_input(graph, sampler, ("steps",), via), int)
    put("guidance", _find_input(graph, sampler, ("cfg",), via), float)
    put("sampler", _find_input(graph, sampler, ("sampler_name",), via), str)
    put("scheduler", _find_input(graph, sampler, ("scheduler",), via), str)
    put("schedule", fields.get("scheduler"), str)  # ComfyUI's name (karras): the service maps it onto ours
    for key, name in (("positive", "prompt"), ("negative", "negative_prompt")):
        link = _find_input_link(graph, sampler, key)
        text = _cond_text(graph, link) if link is not None else None
        if text is not None:
            fields[name] = text
    latent = (sampler.get("inputs") or {}).get("latent_image")
    fields["mode"] = "txt2img"
    for node in _upstream(graph, latent, lambda n: "width" in (n.get("inputs") or {})):
        inputs = node.get("inputs") or {}
        if str(node.get("class_type")) == "VAEEncode":
            fields["mode"] = "img2img"
        if "width" in inputs and "height" in inputs and "width" not in fields:
            put("width", _resolve(graph, inputs["width"]), int)
            put("height", _resolve(graph, inputs["height"]), int)
            put("batch_size", _resolve(graph, inputs.get("batch_size")), int)
    if fields["mode"] == "img2img":
        put("strength", _find_input(graph, sampler, ("denoise",), via), float)
    model_link = _find_input_link(graph, sampler, "model")
    loras = []
    for node in _upstream(graph, model_link, lambda n: "Loader" in str(n.get("class_type")) and "Lora" not in str(n.get("class_type"))):
        inputs = node.get("inputs") or {}
        ctype = str(node.get("class_type"))
        if ctype.startswith("ModelSampling") and "shift" in inputs and "shift" not in fields:
            put("shift", _resolve(graph, inputs["shift"]), float)
        if ctype in ("SkipLayerGuidanceSD3", "SkipLayerGuidanceDiT") and "slg" not in fields:
            layers = _layers(_resolve(graph, inputs.get("layers", inputs.get("double_layers"))))
            numbers = {k: _resolve(graph, inputs.get(src)) for k, src in
                       (("scale", "scale"), ("start", "start_percent"), ("stop", "end_percent"))}
            if layers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()):
                fields["slg"] = {"layers": layers, **{k: float(v) for k, v in numbers.items()}}
        if "Lora" in ctype and isinstance(_resolve(graph, inputs.get("lora_name")), str):
            loras.append({"name": _resolve(graph, inputs["lora_name"]),
                          "weight": _resolve(graph, inputs.get("strength_model", 1.0))})
        for name in ("ckpt_name", "unet_name", "model_name"):
            value = _resolve(graph, inputs.get(name))
            if isinstance(value, str) and "model" not in fields:
                fields["model"] = value
                if v := guess_variant(value):
                    fields["variant"] = v
    if loras:
        fields["loras"] = loras
    units = _controlnets(graph, _find_input_link(graph, sampler, "positive"))
    if units:
        fields["controlnets"] = units
    return fields


_CONTROL_APPLY = ("ControlNetApply", "ControlNetApplyAdvanced", "ControlNetApplySD3")


def _controlnets(graph: dict, positive: Any) -> list[dict]:
    """ComfyUI's ControlNet nodes on the sampler's positive conditioning, nearest first reversed
    (the order they were applied): each apply node's strength and start/end percent, the
    ControlNetLoader's file (a catalog id when it is one of the catalog's files) and the
    preprocessor its image comes from (Canny's thresholds are fractions: ×255). The control image
    itself is not in the PNG."""
    from studio.control_catalog import CONTROLNETS

    found = []
    for node in _upstream(graph, positive, lambda _n: False):
        ctype = str(node.get("class_type"))
        if ctype not in _CONTROL_APPLY:
            continue
        inputs = node.get("inputs") or {}
        unit: dict[str, Any] = {}
        for key, src in (("scale", "strength"), ("start", "start_percent"), ("end", "end_percent")):
            value = _resolve(graph, inputs.get(src))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                unit[key] = float(value)
        for loader in _upstream(graph, inputs.get("control_net"), lambda _n: False):
            name = _resolve(graph, (loader.get("inputs") or {}).get("control_net_name"))
            if isinstance(name, str):
                stem = name.replace("\\", "/").rsplit("/", 1)[-1]
                entry = next((e for e in CONTROLNETS.values() if e.single_file and e.single_file.lower() == stem.lower()
                              or stem.lower().startswith(e.repo_id.rsplit("/", 1)[-1].lower())), None)
                unit["name"] = entry.id if entry else stem
                if entry:
                    unit["type"] = entry.control_type
                break
        unit["preprocess"] = "none"
        for pre in _upstream(graph, inputs.get("image"), lambda n: "LoadImage" in str(n.get("class_type"))):
            pinputs = pre.get("inputs") or {}
            pclass = str(pre.get("class_type"))
            if pclass == "Canny":
                unit["preprocess"] = "canny"
                for key, src in (("canny_low", "low_threshold"), ("canny_high", "high_threshold")):
                    value = _resolve(graph, pinputs.get(src))
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        unit[key] = int(round(float(value) * 255)) if value <= 1 else int(value)
                break
            if "Depth" in pclass:
                unit["preprocess"] = "depth"
                break
            if pclass == "ImageBlur":
                unit["preprocess"] = "blur"
                value = _resolve(graph, pinputs.get("blur_radius"))
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    unit["blur_radius"] = float(value)
                break
        if unit["preprocess"] != "none":
            unit.setdefault("type", unit["preprocess"])
        found.append(unit)
    return list(reversed(found))


def _find_input_link(graph: dict, sampler: dict, name: str) -> Any:
    inputs = sampler.get("inputs") or {}
    if _is_link(graph, inputs.get(name)):
        return inputs[name]
    guider = inputs.get("guider")
    if _is_link(graph, guider):
        ginputs = graph[str(guider[0])].get("inputs") or {}
        for candidate in (name, "conditioning" if name == "positive" else None):
            if candidate and _is_link(graph, ginputs.get(candidate)):
                return ginputs[candidate]
    return None
