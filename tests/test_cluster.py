"Sweeps through `silent_majority.cluster`: the local backend end to end, task serialisation, and a Dask LocalCluster (the cluster extra, which `make test` installs)."
import json, os, pickle, subprocess, sys
import pytest
from silent_majority.cluster import Task, SweepError, main, run_tasks, schedule, sweep_tasks, task_table
from silent_majority.train import erm_config, cached_erm
from silent_majority.finetune import finetune_config, cached_finetune, erm_of
from silent_majority.baselines import jtt_config, cached_jtt

SMOKE = ['--scale', 'smoke', '--seeds', '0', '--datasets', 'waterbirds_like']


def _table(out):
    "Rows of the table `sm-sweep` prints after a run (header dropped), split on whitespace."
    return [line.split() for line in out.strip().splitlines()[1:]]


@pytest.mark.parametrize('scale', ['smoke', 'cpu', 'paper'])
def test_tasks_round_trip_through_json_and_pickle(scale):
    tasks = sweep_tasks(scale, [0, 3], presets=('paper', 'official_code'), criteria=('gradient', 'magnitude', 'smallest_weights'))
    assert {t.kind for t in tasks} == {'erm', 'finetune', 'jtt'} | ({'pretrain'} if scale == 'cpu' else set())   # cpu: the shared backbone
    for t in tasks:
        back = Task.from_dict(json.loads(json.dumps(t.to_dict())))
        assert back == t and back.name == t.name
        assert pickle.loads(pickle.dumps(t)) == t
    assert schedule(tasks) == tasks                       # already scheduled: nothing added, nothing moved


def test_local_sweep_trains_once_then_loads(fresh_cache, capsys):
    args = SMOKE + ['--kinds', 'erm', 'finetune', 'jtt', '--criteria', 'gradient']
    assert main(args + ['--dry-run']) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith('3 tasks, 0 cached, 3 to train')
    assert main(args) == 0
    rows = _table(capsys.readouterr().out)
    assert [(r[0], r[6]) for r in rows] == [('erm', 'trained'), ('finetune', 'trained'), ('jtt', 'trained')], rows
    # the run folders are the ones the library (and so the figure notebooks) load
    ft = finetune_config('waterbirds_like', 'smoke', 'paper', 0)
    names = [cached_erm(erm_of(ft)).run.dir.name, cached_finetune(ft).run.dir.name,
             cached_jtt(jtt_config('waterbirds_like', 'smoke', 'paper', 0, epochs=ft.kick_in + ft.epochs)).run.dir.name]
    assert [r[5] for r in rows] == names
    mtimes = [(fresh_cache/'runs'/n/'done.json').stat().st_mtime_ns for n in names]
    assert main(args + ['--dry-run']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('3 tasks, 3 cached, 0 to train')
    assert main(args) == 0
    assert [r[6] for r in _table(capsys.readouterr().out)] == ['cached'] * 3
    assert [(fresh_cache/'runs'/n/'done.json').stat().st_mtime_ns for n in names] == mtimes   # nothing trained again


def test_missing_dask_names_the_extra(fresh_cache, monkeypatch, capsys):
    for k in [k for k in sys.modules if k.split('.')[0] in ('dask', 'distributed')]: monkeypatch.delitem(sys.modules, k)
    monkeypatch.setitem(sys.modules, 'dask', None); monkeypatch.setitem(sys.modules, 'distributed', None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[cluster\]"'):
        run_tasks([erm_config('waterbirds_like', 'smoke')], backend='dask')
    assert main(SMOKE + ['--kinds', 'erm', '--backend', 'dask']) == 2
    assert 'pip install -e ".[cluster]"' in capsys.readouterr().err
    assert not (fresh_cache/'runs').exists()              # nothing ran


def test_module_imports_without_dask(fresh_cache):
    code = ("import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
            "from silent_majority.cluster import main\n"
            "sys.exit(main(['--scale', 'smoke', '--seeds', '0', '--kinds', 'erm', '--dry-run']))")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert '2 tasks' in p.stdout


def _set_worker_env(client, key, value):
    "Set an environment variable in every worker process (a bound `os.environ` method would pickle a copy of it)."
    client.run(exec, f'import os; os.environ[{key!r}] = {value!r}', {})


def test_dask_local_cluster_shares_the_run_cache(fresh_cache, tmp_path):
    import distributed   # installed by `make setup` (the cluster extra), so this runs on every CI run
    tasks = [erm_config('waterbirds_like', 'smoke', seed=s) for s in (0, 1)]
    # 1. a LocalCluster of 2 worker processes, started by run_tasks, trains both runs into the shared cache
    res = run_tasks(tasks, backend='dask', workers=2, progress=False)
    assert [r['run'] for r in res] == [Task('erm', c).name for c in tasks]
    assert [r['cached'] for r in res] == [False, False]
    assert all(r['pid'] != os.getpid() for r in res)       # trained in the workers, not here
    assert all((fresh_cache/'runs'/r['run']/'done.json').is_file() for r in res)
    assert all(r['versions']['silent_majority'] for r in res)
    assert list((fresh_cache/'sweeps').iterdir()) == []   # the marker is removed afterwards
    # 2. a worker that sees another cache refuses the tasks; pointed at the shared cache, it loads them
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
         distributed.Client(cluster) as client:
        _set_worker_env(client, 'SM_CACHE', str(tmp_path/'elsewhere'))
        with pytest.raises(SweepError, match='shared by the client and every worker') as e:
            run_tasks(tasks[:1], backend='dask', address=cluster.scheduler_address, progress=False)
        assert e.value.results == [None]
        _set_worker_env(client, 'SM_CACHE', str(fresh_cache))
        res2 = run_tasks(tasks, backend='dask', address=cluster.scheduler_address, workers=1, progress=False)
    assert [r['cached'] for r in res2] == [True, True]
    assert [r['result'] for r in res2] == [r['result'] for r in res]
    assert not (tmp_path/'elsewhere'/'runs').exists()
    # 3. no scheduler at the address: a clear exit, not a traceback
    import dask
    with dask.config.set({'distributed.comm.timeouts.connect': '1s'}):
        assert main(SMOKE + ['--kinds', 'erm', '--backend', 'dask', '--address', 'tcp://127.0.0.1:9']) == 2
