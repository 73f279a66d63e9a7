"""sparq kernel generator: one variant table (variants.py), Jinja2 rendering (render.py)."""
