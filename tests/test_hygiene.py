"""Notebook hygiene: figure notebooks are papermill-ready and committed clean; the package matches
the notebooks it is exported from."""
import filecmp, shutil, subprocess, sys
from pathlib import Path
import nbformat
import pytest
from silent_majority.regenerate import figure_notebooks

ROOT = Path(__file__).resolve().parents[1]
FIGURE_NBS = figure_notebooks(ROOT / 'nbs')
LIBRARY_NBS = sorted((ROOT / 'nbs').glob('*.ipynb'))
REQUIRED_PARAMS = ('scale', 'dataset', 'seed', 'out_dir')


@pytest.mark.parametrize('path', FIGURE_NBS, ids=lambda p: p.stem)
def test_figure_notebook_is_papermill_ready(path):
    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(tagged) == 1, f'{path.name}: {len(tagged)} cells tagged "parameters" (want 1)'
    src = tagged[0].source
    for name in REQUIRED_PARAMS:
        assert any(line.split(':')[0].split('=')[0].strip() == name for line in src.splitlines()), f'{path.name}: no {name} parameter'
    assert nb.metadata.get('kernelspec', {}).get('name') == 'python3'
    assert nb.cells[0].cell_type == 'markdown', 'a caption cell comes first'


@pytest.mark.parametrize('path', FIGURE_NBS + LIBRARY_NBS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    outs = sum(len(c.get('outputs', [])) for c in nb.cells if c.cell_type == 'code')
    counts = [c.execution_count for c in nb.cells if c.cell_type == 'code' and c.execution_count]
    assert outs == 0 and not counts, f'{path.name}: {outs} stored outputs; run nbdev_clean'


def test_package_matches_notebooks(tmp_path):
    "nbdev_export on a copy of the notebooks reproduces silent_majority/ byte for byte."
    for name in ('nbs', 'silent_majority'):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    exe = Path(sys.executable).parent / 'nbdev_export'
    subprocess.run([str(exe)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    diff = filecmp.dircmp(ROOT / 'silent_majority', tmp_path / 'silent_majority', ignore=['__pycache__'])
    assert not diff.diff_files and not diff.left_only and not diff.right_only, (
        f'package out of sync with nbs/: differing {diff.diff_files}, only in package {diff.left_only}, '
        f'only exported {diff.right_only}; run nbdev_export')


def test_readme_results_match_committed_figures(tmp_path):
    "The README's results tables are exactly what `refresh_readme` writes from the committed sidecars."
    from silent_majority.regenerate import refresh_readme
    copy = tmp_path / 'README.md'
    shutil.copy(ROOT / 'README.md', copy)
    changed = refresh_readme(copy, ROOT / 'figures', ROOT / 'nbs')
    assert not changed, f'README blocks {changed} differ from the figures; run sm-regenerate --scale cpu (or refresh_readme())'


def test_gallery_matches_committed_figures():
    "figures/README.md is exactly what `sm-regenerate` writes from the committed figures, and every figure is in it."
    from silent_majority.regenerate import gallery, figure_notebooks
    text = gallery(ROOT / 'figures', ROOT / 'nbs')
    assert (ROOT / 'figures' / 'README.md').read_text() == text, \
        'figures/README.md is stale; run sm-regenerate --scale cpu (or regenerate.write_gallery())'
    for nb in figure_notebooks(ROOT / 'nbs'):
        assert f'![{nb.stem}]({nb.stem}.png)' in text and (ROOT / 'figures' / f'{nb.stem}.png').exists(), nb.stem
    assert 'Not regenerated yet' not in text
    assert '(figures/README.md)' in (ROOT / 'README.md').read_text()   # the top-level README links to it


def test_readme_own_model_section_matches_tutorial():
    "Every line of the README's 'Use it on your own model' code block is a line of nbs/tutorial_own_model.ipynb (which `make test` runs)."
    text = (ROOT / 'README.md').read_text()
    assert '## Use it on your own model' in text
    section = text.split('## Use it on your own model', 1)[1].split('\n## ', 1)[0]
    assert 'nbs/tutorial_own_model.ipynb' in section
    block = section.split('```python\n', 1)[1].split('```', 1)[0]
    nb = nbformat.read(str(ROOT / 'nbs' / 'tutorial_own_model.ipynb'), as_version=4)
    tutorial = {l.strip() for c in nb.cells if c.cell_type == 'code' for l in c.source.splitlines()}
    missing = [l for l in block.splitlines() if l.strip() and l.strip() not in tutorial]
    assert not missing, f'README lines not in the tutorial: {missing}'


def test_every_public_docstring_names_its_module():
    "Each exported function and class says in its docstring which module it lives in (`help()` and `?` then show where to import it from)."
    import importlib, inspect, pkgutil
    import silent_majority
    mods = [importlib.import_module(f'silent_majority.{m.name}') for m in pkgutil.iter_modules(silent_majority.__path__)
            if m.name not in ('_modidx', 'all')]
    assert len(mods) > 15
    missing = []
    for mod in mods:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == mod.__name__:
                if f'`{mod.__name__}`' not in (obj.__doc__ or ''): missing.append(f'{mod.__name__}.{name}')
    assert not missing, f'docstrings without their module: {missing}'
