"""Data faults: a cache that served stale pixels, loader holes (repeated rows, other encodings, paths outside the
dataset, 16-bit images, byte-order marks), and SpuCo MNIST held to SpuCo's own rules on hand-checkable cases."""
import io, json, os, warnings
import numpy as np
import pytest
import torch
from PIL import Image
import silent_majority.spuco as D   # the module that holds the SpuCo colour rule (silent_majority.data re-exports it)
from silent_majority.data import (WATERBIRDS_HEADER, waterbirds_fixture, celeba_fixture, load_waterbirds, load_celeba,
                                  eval_transform, to_rgb, decode_images, spuco_mnist, spuco_class_colors,
                                  spuco_train_counts)

SIZE = 32
LOADERS = {'waterbirds': load_waterbirds, 'celeba': load_celeba}


@pytest.fixture
def root(tmp_path, fresh_cache, request):
    "A small on-disk dataset of the requested layout in a private folder, with a private cache."
    name = request.param
    if name == 'waterbirds':
        return name, waterbirds_fixture(tmp_path/'wb', ((2, 1, 1, 2), 1, 1), size=(48, 36), seed=0)
    return name, celeba_fixture(tmp_path/'celeba', ((2, 1, 1, 2), 1, 1), size=(36, 44), seed=0)


def train_files(name, r):
    "The training images of a fixture, in the loader's order."
    if name == 'waterbirds':
        rows = [l.split(',') for l in (r/'metadata.csv').read_text().splitlines()[1:]]
        return [r/row[1] for row in rows if row[3] == '0']
    return [r/'img_align_celeba'/l.split()[0] for l in (r/'list_eval_partition.txt').read_text().splitlines()
            if l.split()[1] == '0']


def load(name, r, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = LOADERS[name](r, 'train', size=SIZE, **kw)
    return ds, [str(m.message) for m in w]


# ---- 1. the image cache covers the image files ----------------------------------------------------------------

BOTH = pytest.mark.parametrize('root', ['waterbirds', 'celeba'], indirect=True)


@BOTH
def test_overwritten_image_rebuilds_the_cache(root):
    name, r = root
    first, _ = load(name, r)
    old = first.x.clone(); del first
    f = train_files(name, r)[1]
    Image.fromarray(np.full((40, 30, 3), (10, 200, 60), np.uint8)).save(f, format='JPEG')   # other pixels
    again, w = load(name, r)
    assert torch.equal(again.x[1], eval_transform(Image.open(f), SIZE)) and not torch.equal(again.x[1], old[1])
    assert torch.equal(again.x[0], old[0])
    assert len(w) == 1 and f'was built from other image files: 1 of ' in w[0] and str(f) in w[0] and 'rebuilding' in w[0]
    assert load(name, r)[1] == []                                                  # rebuilt once, then served


@BOTH
def test_rewrite_with_same_size_and_mtime_needs_verify(root, monkeypatch):
    name, r = root
    old = load(name, r)[0].x.clone()
    f = train_files(name, r)[0]; st = os.stat(f)
    b = bytearray(f.read_bytes()); b[b.index(b'\xff\xdb') + 5] += 1                  # the DC quantiser: same size
    f.write_bytes(bytes(b)); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    stale, w = load(name, r)                                                       # the cheap check cannot see it
    assert w == [] and torch.equal(stale.x, old)
    del stale
    monkeypatch.setenv('SM_VERIFY_CACHE', '1')
    fresh, w = load(name, r)
    assert any("the image files' SHA-256 does not match" in m for m in w), w
    assert torch.equal(fresh.x[0], eval_transform(Image.open(f), SIZE)) and not torch.equal(fresh.x[0], old[0])
    assert load(name, r)[1] == []


@BOTH
def test_unchanged_dataset_loads_from_cache_without_decoding(root, monkeypatch):
    name, r = root
    first = load(name, r)[0].x.clone()                                             # the first load decodes ...
    def fail(fp, *a, **k): raise AssertionError(f'an image was opened: {fp}')
    monkeypatch.setattr(Image, 'open', fail)
    again, w = load(name, r)                                                       # ... the second must not
    assert w == [] and torch.equal(again.x, first)
    with pytest.raises(AssertionError, match='an image was opened'):               # the patch does bite
        LOADERS[name](r, 'train', size=SIZE, cache=False)


@BOTH
def test_missing_image_is_refused_even_when_cached(root):
    name, r = root
    load(name, r)
    f = train_files(name, r)[0]; f.rename(f.with_name('gone'))
    with pytest.raises(FileNotFoundError, match=f"1 of .* images are missing, e.g. \\['{f}'\\]"):
        LOADERS[name](r, 'train', size=SIZE)



# ---- 2. loader holes: the bad-input matrix --------------------------------------------------------------------

def _edit(path, fn):
    path.write_text(fn(path.read_text()))


def _wb_row(r, i, col, value):
    "metadata.csv with field `col` of data row i (0 = line 2) set to `value`."
    lines = (r/'metadata.csv').read_text().splitlines(); f = lines[1 + i].split(',')
    f[WATERBIRDS_HEADER.split(',').index(col)] = value; lines[1 + i] = ','.join(f)
    (r/'metadata.csv').write_text('\n'.join(lines) + '\n')


def _first_train_row(r):
    return next(i for i, l in enumerate((r/'metadata.csv').read_text().splitlines()[1:]) if l.split(',')[3] == '0')


def _wb_field(r, i, col):
    return (r/'metadata.csv').read_text().splitlines()[1 + i].split(',')[WATERBIRDS_HEADER.split(',').index(col)]


def _latin1(path, old, new):
    path.write_bytes(path.read_text().replace(old, new, 1).encode('latin-1'))


BAD_INPUTS = {   # id: (layout, edit of the fixture, exception, text the message must hold)
    'waterbirds repeated img_id': ('waterbirds', lambda r: _wb_row(r, 1, 'img_id', _wb_field(r, 0, 'img_id')),
                                   ValueError, "metadata.csv line 3: img_id '{id0}' repeats line 2"),
    'waterbirds repeated img_filename': ('waterbirds', lambda r: _wb_row(r, 2, 'img_filename', _wb_field(r, 0, 'img_filename')),
                                         ValueError, "metadata.csv line 4: img_filename '{fn0}' repeats line 2"),
    'waterbirds latin-1': ('waterbirds', lambda r: _latin1(r/'metadata.csv', '.jpg\n', '\xe4.jpg\n'),
                           ValueError, 'metadata.csv is not UTF-8 text: byte 0xe4 on line 2'),
    'waterbirds ../ path': ('waterbirds', lambda r: _wb_row(r, 0, 'img_filename', '../outside.jpg'),
                            ValueError, "metadata.csv line 2: image path '../outside.jpg' lies outside the dataset folder"),
    'waterbirds absolute path': ('waterbirds', lambda r: _wb_row(r, 3, 'img_filename', '/etc/hostname'),
                                 ValueError, "metadata.csv line 5: image path '/etc/hostname' lies outside the dataset folder"),
    'waterbirds climbing path': ('waterbirds', lambda r: _wb_row(r, 0, 'img_filename', 'x/../../../outside.jpg'),
                                 ValueError, "image path 'x/../../../outside.jpg' lies outside the dataset folder"),
    'waterbirds empty path': ('waterbirds', lambda r: _wb_row(r, 0, 'img_filename', ''),
                              ValueError, 'metadata.csv line 2: the image path is empty'),
    'celeba repeated image': ('celeba', lambda r: _edit(r/'list_attr_celeba.txt', lambda t: '\n'.join(
                                  [str(int(t.split()[0]) + 1)] + t.splitlines()[1:3] + t.splitlines()[2:]) + '\n'),
                              ValueError, 'list_attr_celeba.txt line 4: 000001.jpg repeats line 3: expected each image once'),
    'celeba repeated partition line': ('celeba', lambda r: _edit(r/'list_eval_partition.txt', lambda t: t + '000002.jpg 0\n'),
                                       ValueError, 'list_eval_partition.txt line 15: 000002.jpg is listed twice'),
    'celeba latin-1 attributes': ('celeba', lambda r: _latin1(r/'list_attr_celeba.txt', '000003.jpg', '00000\xe9.jpg'),
                                  ValueError, 'list_attr_celeba.txt is not UTF-8 text: byte 0xe9 on line 5'),
    'celeba latin-1 partition': ('celeba', lambda r: _latin1(r/'list_eval_partition.txt', '000004.jpg', '00000\xe9.jpg'),
                                 ValueError, 'list_eval_partition.txt is not UTF-8 text: byte 0xe9 on line 4'),
    'celeba ../ path': ('celeba', lambda r: [_edit(r/f, lambda t: t.replace('000002.jpg', '../000002.jpg'))
                                             for f in ('list_attr_celeba.txt', 'list_eval_partition.txt')],
                        ValueError, "list_attr_celeba.txt line 4: image path '../000002.jpg' lies outside the dataset folder"),
    'celeba absolute path': ('celeba', lambda r: [_edit(r/f, lambda t: t.replace('000002.jpg', '/tmp/000002.jpg'))
                                                  for f in ('list_attr_celeba.txt', 'list_eval_partition.txt')],
                             ValueError, "image path '/tmp/000002.jpg' lies outside the dataset folder"),
    'celeba float image': ('celeba', lambda r: _replace_image(r/'img_align_celeba'/'000002.jpg', np.zeros((44, 36), np.float32), 'TIFF'),
                           ValueError, 'a 32-bit floating-point image (mode F): expected 8-bit images or 16-bit greyscale'),
}


def _replace_image(f, arr, fmt):
    b = io.BytesIO(); Image.fromarray(arr).save(b, fmt); f.write_bytes(b.getvalue())


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_raises_naming_the_problem(case, tmp_path, fresh_cache):
    name, edit, exc, message = BAD_INPUTS[case]
    r = (waterbirds_fixture(tmp_path/'wb', ((2, 1, 1, 2), 1, 1), size=(48, 36), seed=0) if name == 'waterbirds' else
         celeba_fixture(tmp_path/'celeba', ((2, 1, 1, 2), 1, 1), size=(36, 44), seed=0))
    if name == 'waterbirds': message = message.format(id0=_wb_field(r, 0, 'img_id'), fn0=_wb_field(r, 0, 'img_filename'))
    edit(r)
    with pytest.raises(exc) as e: LOADERS[name](r, 'train', size=SIZE)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize('name,files', [('waterbirds', ['metadata.csv']),
                                        ('celeba', ['list_attr_celeba.txt']), ('celeba', ['list_eval_partition.txt']),
                                        ('celeba', ['list_attr_celeba.txt', 'list_eval_partition.txt'])])
def test_utf8_byte_order_mark_is_accepted(name, files, tmp_path, fresh_cache):
    r = (waterbirds_fixture(tmp_path/'wb', ((2, 1, 1, 2), 1, 1), size=(48, 36), seed=0) if name == 'waterbirds' else
         celeba_fixture(tmp_path/'celeba', ((2, 1, 1, 2), 1, 1), size=(36, 44), seed=0))
    plain = LOADERS[name](r, 'train', size=SIZE, cache=False)
    for f in files: (r/f).write_bytes(b'\xef\xbb\xbf' + (r/f).read_bytes())
    bom = LOADERS[name](r, 'train', size=SIZE, cache=False)
    assert torch.equal(bom.x, plain.x) and torch.equal(bom.g, plain.g)


def test_16bit_png_is_scaled_not_clipped(tmp_path, fresh_cache):
    r = waterbirds_fixture(tmp_path/'wb', ((2, 1, 1, 2), 1, 1), size=(48, 36), seed=0)
    ramp = (np.arange(36 * 48).reshape(36, 48) * 37).astype(np.uint16)          # 0 .. 63,899: mostly above 255
    f = r/'deep.png'; Image.fromarray(ramp).save(f)
    assert Image.open(f).mode == 'I;16'
    _wb_row(r, _first_train_row(r), 'img_filename', 'deep.png')
    x = load_waterbirds(r, 'train', size=SIZE).x[0]
    expected = eval_transform(Image.fromarray(((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)), SIZE)
    assert torch.equal(x, expected)
    clipped = eval_transform(Image.open(f).convert('RGB'), SIZE)                  # PIL's own conversion
    assert (clipped == 255).float().mean() > 0.95 and (x == 255).float().mean() < 0.05
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 257, 65535]], np.uint16))))[0, :, 0].tolist() == [0, 1, 255]


def test_16bit_and_bad_modes_through_decode_images(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(tmp_path/'i32.tif')   # mode I within 16 bits: scaled
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path/'big.tif')   # beyond 16 bits: refused
    assert decode_images([tmp_path/'i32.tif'], 8).max() == 255
    with pytest.raises(ValueError, match=r'a 32-bit integer image \(mode I\) with values from 0 to 70000'):
        decode_images([tmp_path/'big.tif'], 8)


# ---- 3. SpuCo MNIST follows SpuCoMNIST's rules ----------------------------------------------------------------

def test_spuco_colour_rule_by_hand():
    # class 1 of 5: others = [0, 2, 3, 4]; positions 0 and 3 are majority, the rest take others[i % 4]
    assert spuco_class_colors(1, 5, [1, 0, 0, 1, 0, 0, 0, 0, 0]).tolist() == [1, 2, 3, 1, 0, 2, 3, 4, 0]
    assert spuco_class_colors(4, 5, [0] * 6).tolist() == [0, 1, 2, 3, 0, 1]
    assert spuco_class_colors(0, 2, [0, 1, 0]).tolist() == [1, 0, 1]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_spuco_majority_is_int_of_s_times_n_and_minorities_go_by_position(seed, monkeypatch):
    "K = 5, 90 images per class, strength 0.7: int(0.7 * 90) = 62 in the class's own colour (not 63); the others by position."
    calls = []
    def spy(c, k, majority):
        out = rule(c, k, majority); calls.append((c, np.asarray(majority, bool).copy(), out.copy())); return out
    rule = D.spuco_class_colors
    monkeypatch.setattr(D, 'spuco_class_colors', spy)
    ds = spuco_mnist('train', strength=0.7, n_per_class=90, seed=seed)
    counts = np.array(ds.group_counts()).reshape(5, 5)
    assert np.diag(counts).tolist() == [62] * 5 and counts.sum(1).tolist() == [90] * 5
    assert [c for c, _, _ in calls] == [0, 1, 2, 3, 4]
    for c, majority, colours in calls:
        assert majority.sum() == 62
        others = [j for j in range(5) if j != c]
        free = np.flatnonzero(~majority)                                           # positions of the minority images
        assert colours[free].tolist() == [others[i % 4] for i in free]              # the i-th image: others[i % (K-1)]
        assert np.bincount(colours, minlength=5).tolist() == counts[c].tolist()      # shuffled, not changed
    assert ds.group_counts() == spuco_train_counts([90] * 5, 0.7, seed=seed)


def test_spuco_minority_groups_are_not_balanced():
    "The positional rule leaves minority groups of unequal size (an even spread would differ by at most one)."
    spreads = []
    for seed in range(3):
        c = np.array(spuco_train_counts([90] * 5, 0.7, seed=seed)).reshape(5, 5)
        spreads += [int(np.ptp(np.delete(row, i))) for i, row in enumerate(c)]
    assert max(spreads) > 1, spreads


def test_spuco_val_split_follows_spuco():
    balanced = [40] * 25
    assert spuco_mnist('val').group_counts() == balanced                             # no strength: balanced
    corr = np.array(spuco_mnist('val', strength=0.95).group_counts()).reshape(5, 5)  # a strength: correlated, as train
    assert np.diag(corr).tolist() == [int(0.95 * 200)] * 5
    assert spuco_mnist('val', strength=0.95, val='balanced').group_counts() == balanced
    assert spuco_mnist('val', strength=0.0).group_counts() == balanced                # SpuCo: 0 means none given
    assert spuco_mnist('test', strength=0.95).group_counts() == balanced


def test_spuco_label_and_core_feature_noise():
    clean = spuco_mnist('train', n_per_class=100, strength=0.8, seed=2)
    ds = spuco_mnist('train', n_per_class=100, strength=0.8, seed=2, label_noise=0.1, core_feature_noise=0.3)
    noisy, core, y0 = ds.extras['noisy_label'], ds.extras['core_noise'], ds.extras['clean_y']
    assert (int(noisy.sum()), int(core.sum())) == (int(0.1 * 500), int(0.3 * 500))
    assert torch.equal(y0, clean.y) and torch.equal(ds.a, clean.a)
    assert (ds.y[noisy] != y0[noisy]).all() and torch.equal(ds.y[~noisy], y0[~noisy])
    assert ds.group_counts() == torch.bincount(ds.y * 5 + ds.a, minlength=25).tolist()    # groups use the noisy label
    ink = lambda d: ((d.x[:, 0] == d.x[:, 1]) & (d.x[:, 1] == d.x[:, 2])).sum((1, 2)).float()
    kept = (ink(ds)[core] / ink(clean)[core]).mean().item()
    assert 0.3 < kept < 0.5                                                      # P(N(0,1) > 0.25) = 0.40
    assert torch.equal(ds.x[~core], clean.x[~core])
    test = spuco_mnist('test', n_per_class=100, strength=0.8, seed=2, label_noise=0.1, core_feature_noise=0.3)
    assert test.extras['noisy_label'].sum() == 0 and test.extras['core_noise'].sum() == 0
    assert test.train_counts == ds.group_counts()


SPUCO_BAD = {
    'val mode': (dict(split='val', val='skewed'), "val must be 'correlated', 'balanced' or None"),
    'label noise': (dict(split='train', label_noise=1.5), 'label_noise must be a number in [0, 1]'),
    'core noise': (dict(split='train', core_feature_noise='lots'), 'core_feature_noise must be a number in [0, 1]'),
    'strength': (dict(split='train', strength=[0.9, 0.9]), 'a list of 5 such numbers'),
    'too strong for the class size': (dict(split='train', n_per_class=100, strength=0.95),
                                      'need not reach every other colour; expected a lower strength'),
    'correlated val too strong': (dict(split='val', strength=0.95, seed=1), ", or val='balanced'"),
    'no strength for a class': (dict(split='train', strength=[0.9, 0.9, 0.0, 0.9, 0.9]),
                                'leaves classes [2] without an image in their own colour'),
}


@pytest.mark.parametrize('case', list(SPUCO_BAD))
def test_spuco_bad_input_names_what_was_expected(case):
    kw, message = SPUCO_BAD[case]
    with pytest.raises(ValueError) as e: spuco_mnist(**kw)
    assert message in str(e.value), str(e.value)
