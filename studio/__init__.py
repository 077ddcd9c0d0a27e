"""SD3.5 Studio: a local studio for Stable Diffusion 3 / 3.5 (txt2img, img2img, inpaint, Turbo,
a gallery, a model manager). Start it with ``python launch.py``; see ``studio.app.cli``."""
