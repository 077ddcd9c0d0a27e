"""Cheap live previews of SD3 latents: a 16×3 latent→RGB projection, no VAE and no download."""

from __future__ import annotations

# ComfyUI's SD3 latent → RGB factors (16 × 3) and bias: a cheap preview with no download.
SD3_LATENT_RGB = [
    [-0.0645, 0.0177, 0.1052], [0.0028, 0.0312, 0.0650], [0.1848, 0.0762, 0.0360],
    [0.0944, 0.0360, 0.0889], [0.0897, 0.0506, -0.0364], [-0.0020, 0.1203, 0.0284],
    [0.0855, 0.0118, 0.0283], [-0.0539, 0.0658, 0.1047], [-0.0057, 0.0116, 0.0700],
    [-0.0412, 0.0281, -0.0039], [0.1106, 0.1171, 0.1220], [-0.0248, 0.0682, -0.0481],
    [0.0815, 0.0846, 0.1207], [-0.0120, -0.0055, -0.0867], [-0.0749, -0.0634, -0.0456],
    [-0.1418, -0.1457, -0.1259],
]
SD3_LATENT_RGB_BIAS = [0.2394, 0.2135, 0.1925]


def latents_to_preview(latents, max_side: int = 256):
    """A cheap RGB preview of SD3 latents (first image of the batch) as a PIL image."""
    import torch
    from PIL import Image

    lat = latents[0].detach().float().cpu()  # (16, h, w)
    factors = torch.tensor(SD3_LATENT_RGB)
    rgb = torch.einsum("chw,cr->rhw", lat, factors) + torch.tensor(SD3_LATENT_RGB_BIAS)[:, None, None]
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(rgb)
    scale = max_side / max(image.size)
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.NEAREST)


