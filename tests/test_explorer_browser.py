"""The neuron explorer in a real browser: JupyterLab on 127.0.0.1 in headless Chromium (Playwright) runs
nbs/explore.ipynb at smoke scale, the k slider is moved with the keyboard, and the chart must change.
Skipped when Chromium or Playwright is missing, except under CI (CI=true), where that is a failure.
Deselect with `-m "not browser"`."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'nbs' / 'explore.ipynb'
CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
SCREENSHOT = ROOT / '.cache' / 'browser' / 'explorer.png'
FAILURE_SHOT = ROOT / '.cache' / 'browser' / 'explorer_failure.png'
STEP_MS = 90_000   # the longest single wait (server start, run-all at smoke scale, one update)

pytestmark = pytest.mark.browser


def _tools_missing() -> str:
    "Why the browser test cannot run here ('' when it can)."
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return 'Python playwright is not installed'
    if not CHROMIUM.exists(): return f'{CHROMIUM} is missing (Debian package chromium)'
    return ''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _smoke_notebook(dest: Path) -> Path:
    "A copy of the explorer notebook at smoke scale, without its inline tests (nbdev_test runs those)."
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == 'code')
    keep = lambda i, c: (c.cell_type != 'code' or i == last or 'parameters' in c.metadata.get('tags', [])
                         or c.source.startswith(('#| export', '#| default_exp')))
    nb.cells = [c for i, c in enumerate(nb.cells) if keep(i, c)]
    cell = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
    lines = cell.source.splitlines()
    cell.source = '\n'.join("scale: str = 'smoke'" if l.split(':')[0].strip() == 'scale' else l for l in lines)
    assert "scale: str = 'smoke'" in cell.source, cell.source
    nbformat.write(nb, str(dest)); return dest


def _start_lab(root: Path, home: Path, port: int, token: str, env: dict) -> subprocess.Popen:
    "JupyterLab on 127.0.0.1:port serving `root`, with every Jupyter directory under `home`."
    for sub in ('config', 'data', 'runtime', 'ipython', 'settings/@jupyterlab/apputils-extension', 'workspaces'):
        (home / sub).mkdir(parents=True, exist_ok=True)
    # no news or update checks (no network here), so no notification covers the notebook
    (home / 'settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings').write_text(
        json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    env.update(JUPYTER_CONFIG_DIR=str(home / 'config'), JUPYTER_DATA_DIR=str(home / 'data'),
               JUPYTER_RUNTIME_DIR=str(home / 'runtime'), IPYTHONDIR=str(home / 'ipython'),
               JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'), JUPYTERLAB_WORKSPACES_DIR=str(home / 'workspaces'),
               JUPYTER_PLATFORM_DIRS='1', HOME=str(home))
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
           '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=', '--LabApp.extension_manager=readonly',
           '--ServerApp.terminals_enabled=False'] + (['--allow-root'] if os.geteuid() == 0 else [])
    log = open(home / 'lab.log', 'w')
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_server(proc, url: str, log: Path, timeout: float = STEP_MS / 1000):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f'JupyterLab exited ({proc.returncode}):\n{log.read_text()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.5)
    raise TimeoutError(f'JupyterLab did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}')


def _stop(proc: subprocess.Popen):
    "Stop the server and the kernels it started (its own process group)."
    if proc.poll() is not None: return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
    except ProcessLookupError: pass


def test_explorer_slider_updates_chart_in_jupyterlab(tmp_path, monkeypatch):
    missing = _tools_missing()
    if missing:
        if os.environ.get('CI', '').lower() == 'true': pytest.fail(f'CI must be able to run the browser test: {missing}')
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright
    from silent_majority.core import cache_dir
    from silent_majority.train import cached_erm, erm_config

    figures = tmp_path / 'figures'
    monkeypatch.setenv('SM_PROGRESS', '0')
    t0 = time.time(); phases = {}
    mark = lambda name: phases.setdefault(name, round(time.time() - t0, 1))
    cached_erm(erm_config(scale='smoke'))   # the run the notebook opens: in the run cache, or trained now (seconds)
    mark('smoke run')
    root = tmp_path / 'lab'; root.mkdir()
    _smoke_notebook(root / 'explore.ipynb')
    env = dict(os.environ, SM_CACHE=str(cache_dir()), SM_FIGURES=str(figures), SM_PROGRESS='0', PYTHONPATH=str(ROOT),
               SM_DEVICE='cpu', PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    port, token = _free_port(), uuid.uuid4().hex
    proc = _start_lab(root, tmp_path / 'home', port, token, env)
    base = f'http://127.0.0.1:{port}'
    try:
        _wait_for_server(proc, f'{base}/api/status?token={token}', tmp_path / 'home' / 'lab.log'); mark('server up')
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={'width': 1400, 'height': 1100})
            try:
                page.set_default_timeout(STEP_MS)
                page.goto(f'{base}/lab/tree/explore.ipynb?token={token}')
                # the notebook is open and its kernel is up
                page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                    return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
                              && w.sessionContext.session.kernel.connectionStatus === 'connected'
                              && w.sessionContext.session.kernel.status === 'idle'); }""", polling=250)
                mark('kernel idle')
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                chart = page.locator('img.sm-chart')
                status = page.locator('.sm-status')
                chart.wait_for(state='attached')
                page.wait_for_function("""() => { const s = document.querySelector('.sm-status');
                    const i = document.querySelector('img.sm-chart');
                    return s && s.textContent.includes('updated in') && i && i.getAttribute('src'); }""", polling=250)
                assert 'k = 3' in status.text_content(), status.text_content()
                mark('explorer shown')
                before = chart.get_attribute('src')
                handle = page.locator('.sm-k .noUi-handle')
                handle.scroll_into_view_if_needed(); handle.focus()
                page.keyboard.press('ArrowRight')
                page.wait_for_function("""(old) => { const i = document.querySelector('img.sm-chart');
                    const s = document.querySelector('.sm-status');
                    return i && i.getAttribute('src') !== old && s.textContent.includes('k = 4'); }""",
                    arg=before, polling=250)
                after = chart.get_attribute('src'); mark('chart changed')
                assert after and after != before
                assert page.locator('.sm-k .widget-readout').text_content().strip() == '4'
                # Save figure writes the view (SM_FIGURES points into tmp_path)
                page.locator('.sm-explorer button', has_text='Save figure').click()
                page.wait_for_function("() => (document.querySelector('.sm-saved') || {}).textContent?.includes('saved')",
                                       polling=250)
                saved = sorted((figures / 'explorer').glob('*_k4_*'))
                assert {q.suffix for q in saved} == {'.png', '.pdf', '.csv', '.json'}, saved
                mark('saved')
                explorer = page.locator('.sm-explorer')
                explorer.scroll_into_view_if_needed()
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                explorer.screenshot(path=str(SCREENSHOT))
                if os.environ.get('SM_SCREENSHOT_DIR'):
                    out = Path(os.environ['SM_SCREENSHOT_DIR']); out.mkdir(parents=True, exist_ok=True)
                    shutil.copy(SCREENSHOT, out / SCREENSHOT.name)
                mark('screenshot')
            except Exception as e:   # keep what the page showed and what the server said
                FAILURE_SHOT.parent.mkdir(parents=True, exist_ok=True)
                try: page.screenshot(path=str(FAILURE_SHOT))
                except Exception: pass
                log = (tmp_path / 'home' / 'lab.log').read_text()[-3000:]
                raise AssertionError(f'{type(e).__name__}: {e}\nscreenshot: {FAILURE_SHOT}\nJupyterLab log (tail):\n{log}') from e
            finally:
                browser.close()
    finally:
        _stop(proc); mark('server stopped')
    print('seconds since start:', phases)   # shown with pytest -s or -rP
