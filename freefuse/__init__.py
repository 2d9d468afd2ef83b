"""FreeFuse core: subject masks from attention and masked LoRA deltas.

Pure torch / numpy / scikit-image. Nothing in this package (outside ``freefuse.forge``) imports Forge,
gradio or the webui; ``tests/core/test_no_forge_imports.py`` enforces it.
"""
