"""Full-resolution Waterbirds and CelebA fixtures through the loaders and the memory-mapped image cache."""
import csv, json, os, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from silent_majority.core import file_sha256
from silent_majority.data import (SPLITS, IMAGENET_MEAN, CELEBA_ATTRS, waterbirds_fixture, celeba_fixture,
                                  load_waterbirds, load_celeba, eval_transform, to_float, augment)

WB_COUNTS = ((3, 1, 1, 2), (1, 1, 1, 1), (1, 1, 1, 1))   # (train, val, test) x (G0..G3)
CB_COUNTS = ((2, 2, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1))
LINUX = Path('/proc/self/maps').exists()


def mapped_file(t: torch.Tensor):
    "The file whose memory map holds the tensor's data (from /proc/self/maps), else None."
    p = t.data_ptr()
    for line in Path('/proc/self/maps').read_text().splitlines():
        f = line.split(maxsplit=5); lo, hi = (int(v, 16) for v in f[0].split('-'))
        if lo <= p < hi: return f[5] if len(f) > 5 else None


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    return {'waterbirds': waterbirds_fixture(d/'waterbird_complete95_forest2water2', WB_COUNTS, seed=0),
            'celeba': celeba_fixture(d/'celeba', CB_COUNTS, seed=0)}


LOADERS = {'waterbirds': load_waterbirds, 'celeba': load_celeba}
COUNTS = {'waterbirds': WB_COUNTS, 'celeba': CB_COUNTS}


def image_files(name, root, split):
    "The image files of a split, in the loader's order, read from the fixture's own metadata."
    code = str(SPLITS.index(split))
    if name == 'waterbirds':
        with open(root/'metadata.csv', newline='') as f:
            return [root/r['img_filename'] for r in csv.DictReader(f) if r['split'] == code]
    lines = (root/'list_eval_partition.txt').read_text().split('\n')
    return [root/'img_align_celeba'/l.split()[0] for l in lines if l.strip() and l.split()[1] == code]


def cache_files(cache, name, split):
    return sorted((cache/'datasets').glob(f'{name}-{split}-224-*.npy'))


def test_fixture_layouts(roots):
    wb, cb = roots['waterbirds'], roots['celeba']
    lines = (wb/'metadata.csv').read_text().splitlines()
    assert lines[0] == 'img_id,img_filename,y,split,place,place_filename' and len(lines) == 1 + sum(map(sum, WB_COUNTS))
    sizes = {Image.open(p).size for s in SPLITS for p in image_files('waterbirds', wb, s)}
    assert (500, 375) in sizes and max(max(s) for s in sizes) == 500 and len(sizes) > 1   # full resolution, varied
    assert all(Image.open(p).format == 'JPEG' for p in image_files('waterbirds', wb, 'train'))
    attr = (cb/'list_attr_celeba.txt').read_text().splitlines()
    assert attr[0] == str(sum(map(sum, CB_COUNTS))) and tuple(attr[1].split()) == CELEBA_ATTRS and len(CELEBA_ATTRS) == 40
    assert all(len(l.split()) == 41 for l in attr[2:])
    assert {Image.open(p).size for p in (cb/'img_align_celeba').iterdir()} == {(178, 218)}


@pytest.mark.parametrize('name', ['waterbirds', 'celeba'])
def test_every_split_loads_and_maps_the_cache(roots, fresh_cache, name):
    root, load = roots[name], LOADERS[name]
    for split, counts in zip(SPLITS, COUNTS[name]):
        ds = load(root, split, size=224)
        assert (ds.x.dtype, tuple(ds.x.shape)) == (torch.uint8, (sum(counts), 3, 224, 224))
        assert ds.group_counts() == list(counts) and ds.train_counts == list(COUNTS[name][0])
        assert (ds.mean, ds.y.dtype, ds.g.tolist()) == (IMAGENET_MEAN, torch.int64, (2 * ds.y + ds.a).tolist())
        files = image_files(name, root, split)
        assert torch.equal(ds.x[-1], eval_transform(Image.open(files[-1]), 224))     # decoded as the eval transform
        (npy,) = cache_files(fresh_cache, name, split)
        if LINUX: assert mapped_file(ds.x) == str(npy.resolve())                    # the map of the cache file, not a copy
        side = json.loads(npy.with_suffix('.json').read_text())
        assert (side['shape'], side['dtype'], side['size'], side['sha256']) == \
               ([sum(counts), 3, 224, 224], 'uint8', npy.stat().st_size, file_sha256(npy))


@pytest.mark.parametrize('name', ['waterbirds', 'celeba'])
def test_second_load_reads_no_image(roots, fresh_cache, name, monkeypatch):
    root, load = roots[name], LOADERS[name]
    first = load(root, 'train', size=224).x.clone()
    def fail(fp, *a, **k): raise AssertionError(f'an image was opened: {fp}')
    monkeypatch.setattr(Image, 'open', fail)                                        # no image may be decoded ...
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                              # ... no rebuild, no warning
        again = load(root, 'train', size=224)
    assert torch.equal(again.x, first)
    if LINUX: assert mapped_file(again.x) == str(cache_files(fresh_cache, name, 'train')[0].resolve())
    with pytest.raises(AssertionError, match='an image was opened'):
        load(root, 'train', size=224, cache=False)


def test_truncated_cache_is_detected_and_rebuilt(roots, fresh_cache):
    root = roots['waterbirds']
    expected = load_waterbirds(root, 'train', size=224).x.clone()                  # the mapped tensor is dropped at once:
    (npy,) = cache_files(fresh_cache, 'waterbirds', 'train')                       # truncating a file under a live map
    os.truncate(npy, npy.stat().st_size // 2)                                      # would fault on the next read
    with pytest.warns(UserWarning, match=f'dataset cache {npy}.*truncated or altered.*rebuilding it'):
        ds = load_waterbirds(root, 'train', size=224)
    assert torch.equal(ds.x, expected)
    assert file_sha256(npy) == json.loads(npy.with_suffix('.json').read_text())['sha256']
    assert not list((fresh_cache/'datasets').glob('.*.tmp'))                       # no temporary file left behind


def test_altered_byte_needs_verify(roots, fresh_cache, monkeypatch):
    root = roots['celeba']
    expected = load_celeba(root, 'val', size=224).x.clone()
    (npy,) = cache_files(fresh_cache, 'celeba', 'val')
    b = bytearray(npy.read_bytes()); b[-5] ^= 0x40
    npy.unlink(); npy.write_bytes(bytes(b))                                        # same size, one byte changed
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not torch.equal(load_celeba(root, 'val', size=224).x, expected)     # the cheap checks pass it
    monkeypatch.setenv('SM_VERIFY_CACHE', '1')
    with pytest.warns(UserWarning, match='does not match the SHA-256'):
        assert torch.equal(load_celeba(root, 'val', size=224).x, expected)
    monkeypatch.delenv('SM_VERIFY_CACHE')
    npy.with_suffix('.json').unlink()                                              # a lost sidecar
    with pytest.warns(UserWarning, match=f'dataset cache {npy} has no sidecar'):
        assert torch.equal(load_celeba(root, 'val', size=224).x, expected)


def test_training_batches_from_the_map_leave_the_file_alone(roots, fresh_cache):
    ds = load_waterbirds(roots['waterbirds'], 'train', size=224)
    (npy,) = cache_files(fresh_cache, 'waterbirds', 'train')
    digest = file_sha256(npy)
    idx = torch.tensor([4, 0, 2])
    xb = to_float(ds.x[idx], ds.mean, ds.std)                                       # a gathered batch is a copy in RAM
    out = augment(xb, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 224, 224) and torch.isfinite(out).all()
    sub = ds.subset([1, 3])
    assert torch.equal(sub.x, ds.x[[1, 3]]) and sub.train_counts == ds.train_counts
    assert torch.equal(ds[2][1], ds.x[2]) and file_sha256(npy) == digest


def test_concurrent_builders_decode_once(roots, fresh_cache, monkeypatch):
    "Two loaders of one split at once: one builds under the file lock, the other waits and maps the same file."
    import threading, time
    import silent_majority.imagecache as D   # the module that builds the cache (silent_majority.data re-exports its loaders)
    built, build = [], D._build_cache
    def slow_build(*a, **k):                       # hold the lock a moment so that the other loader arrives meanwhile
        built.append(1); time.sleep(0.5); build(*a, **k)
    monkeypatch.setattr(D, '_build_cache', slow_build)
    start, out = threading.Barrier(2), [None, None]
    def load(i):
        start.wait(); out[i] = load_celeba(roots['celeba'], 'train', size=224).x
    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert len(built) == 1 and torch.equal(out[0], out[1])
    (npy,) = cache_files(fresh_cache, 'celeba', 'train')
    if LINUX: assert {mapped_file(x) for x in out} == {str(npy.resolve())}
    assert not list((fresh_cache/'datasets').glob('.*.tmp'))
