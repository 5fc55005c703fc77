"""Generate README.md from nbs/index.ipynb with nbconvert's markdown exporter (Quarto can't run offline here).
`--check` exits 1 when README.md differs from what would be generated."""
import sys, copy
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parent.parent
HEADER = '<!-- generated from nbs/index.ipynb by .ci/make_readme.py: edit the notebook, not this file -->\n\n'

def render() -> str:
    nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
    nb = copy.deepcopy(nb)
    keep = []
    for c in nb.cells:
        src = c.source.lstrip()
        if c.cell_type == 'code' and ('#| hide' in src or src.startswith('#|hide')): continue
        if c.cell_type == 'raw': continue   # Quarto front matter
        if c.cell_type == 'code': c.outputs = []
        keep.append(c)
    nb.cells = keep
    body, _ = MarkdownExporter().from_notebook_node(nb)
    return HEADER + body.strip() + '\n'

if __name__ == '__main__':
    text = render()
    if '--check' in sys.argv:
        sys.exit(0 if (root/'README.md').exists() and (root/'README.md').read_text() == text else 1)
    (root/'README.md').write_text(text)
    print('wrote README.md')
