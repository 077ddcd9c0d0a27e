"""Hugging Face Space entry (README front matter: ``app_file: app.py``).

Runs the studio in Space mode (see ``studio/app/spaces.py``): shared, a gallery per browser
session, catalog models only, the default model loaded at start-up. ``SD35_STUDIO_DEMO=1`` runs
the offline demo family. On ZeroGPU (``SPACES_ZERO_GPU`` set by the platform) each generation's
inference runs in a ZeroGPU worker; loading and saving stay in this process. Locally,
``python launch.py`` is the entry point; ``SPACE_ID=me/studio python app.py`` imitates a Space.
"""

# ZeroGPU: `spaces` must be imported before anything imports torch (it patches CUDA
# initialisation). It is installed on Spaces; elsewhere the studio runs without it.
try:
    import spaces  # noqa: F401
except ImportError:
    spaces = None

from studio.app.spaces import main  # noqa: E402  (after `spaces`, on purpose)

if __name__ == "__main__":
    main()
