"""Renders the variant table's templates with Jinja2."""
import os
import jinja2

from . import variants as table

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "templates")


def environment():
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def outputs(cfg):
    """The files render_all writes, in order: one per variant, then the registry."""
    return [v.output for v in table.variants(cfg)] + [table.REGISTRY_OUTPUT[cfg.backend]]


def inputs():
    """Every file whose edit must re-render: templates and the generator itself."""
    found = []
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (TEMPLATES_DIR, here, os.path.dirname(here)):
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith((".j2", ".py", ".glsl", ".cuh")) and "__pycache__" not in dirpath:
                    found.append(os.path.join(dirpath, f))
            if root != TEMPLATES_DIR:
                break
    return sorted(set(found))


def _write_if_changed(path, text):
    # Unchanged outputs keep their timestamps, so ninja recompiles only what really changed.
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def render_all(cfg, out_dir):
    env = environment()
    found = table.variants(cfg)
    os.makedirs(out_dir, exist_ok=True)
    for v in found:
        text = env.get_template(v.template).render(variant=v, cfg=cfg, **v.param)
        _write_if_changed(os.path.join(out_dir, v.output), text)
    registry = env.get_template(table.REGISTRY_TEMPLATE[cfg.backend]).render(variants=found, cfg=cfg)
    _write_if_changed(os.path.join(out_dir, table.REGISTRY_OUTPUT[cfg.backend]), registry)
