"""The loader's fast paths give the values of the plain pipeline they replace, draw for draw."""
import torch
import torch.nn.functional as F

from kd.data import BatchTransform, TensorLoader, augment_batch


def _plain(x, tf, padding, flip, seed):
    """The former pipeline: uint8 crop and flip (augment_batch), then float, scale and normalise."""
    out = augment_batch(x, padding, flip, torch.Generator().manual_seed(seed))
    return out.float().mul_(tf.mul).add_(tf.add)


def _per_image(x, padding, flip, seed):
    """Reference: the same draws, each image padded, cropped and mirrored on its own."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    mirror = (torch.rand(b, generator=g) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    di = torch.randint(0, 2 * padding + 1, (b,), generator=g) if padding else torch.zeros(b, dtype=torch.long)
    dj = torch.randint(0, 2 * padding + 1, (b,), generator=g) if padding else torch.zeros(b, dtype=torch.long)
    out = []
    for i in range(b):
        img = F.pad(x[i], (padding,) * 4)
        if mirror[i]:
            img = img.flip(-1)  # mirroring the padded image then cropping = cropping then mirroring
            img = img[:, di[i]:di[i] + h, 2 * padding - dj[i]:2 * padding - dj[i] + w]
        else:
            img = img[:, di[i]:di[i] + h, dj[i]:dj[i] + w]
        out.append(img)
    return torch.stack(out)


def test_normalised_crop_equals_crop_then_normalise_bit_for_bit():
    for c, (padding, flip) in [(1, (2, True)), (3, (4, True)), (3, (2, False)), (1, (0, True))]:
        x = torch.randint(0, 256, (17, c, 9, 7), dtype=torch.uint8)
        tf = BatchTransform(255.0, (0.3,) * c, (0.4,) * c, padding, flip)
        for seed in range(4):  # repeated calls reuse the workspace
            got = tf(x, train=True, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(got, _plain(x, tf, padding, flip, seed))


def test_crop_equals_a_per_image_crop_for_the_same_draws():
    x = torch.randint(0, 256, (9, 2, 6, 5), dtype=torch.uint8)
    for padding, flip in [(2, True), (1, False), (0, True)]:
        for seed in range(3):
            ref = _per_image(x, padding, flip, seed)
            assert torch.equal(augment_batch(x, padding, flip, torch.Generator().manual_seed(seed)), ref)
            tf = BatchTransform(255.0, (0.2, 0.5), (0.3, 0.6), padding, flip)
            got = tf(x, train=True, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(got, ref.float().mul_(tf.mul).add_(tf.add))


def test_batch_shape_change_resets_the_workspace():
    tf = BatchTransform(255.0, (0.5,), (0.5,), 2, True)
    for b in (8, 3, 8):
        x = torch.randint(0, 256, (b, 1, 6, 6), dtype=torch.uint8)
        assert torch.equal(tf(x, True, torch.Generator().manual_seed(b)), _plain(x, tf, 2, True, b))


def test_eval_normalisation_does_not_touch_float_inputs():
    x = torch.rand(4, 1, 5, 5)
    before = x.clone()
    tf = BatchTransform(1.0, (0.5,), (0.25,))
    out = tf(x, train=False)
    assert torch.equal(x, before)
    assert torch.equal(out, x.float().mul(tf.mul).add_(tf.add))


def test_loader_batches_equal_the_indexed_batches():
    x = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    y = torch.randint(0, 10, (50,))
    for xb, yb, idx in TensorLoader(x, y, 16, shuffle=True, seed=3):
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])


def _ra_images(b=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, 1, 12, 12), dtype=torch.uint8, generator=g)
    x[:, :, 3:9, 3:9] = torch.randint(100, 256, (b, 1, 6, 6), dtype=torch.uint8, generator=g)  # some structure
    return x


def test_batched_rand_augment_equals_per_image_application_of_the_same_draws():
    from kd.data.augment import RAND_AUGMENT_OPS, BatchRandAugment, rand_augment_op
    from kd.data.augment import _RA_SPACE

    x = _ra_images()
    ra = BatchRandAugment(9, 2)
    g = torch.Generator().manual_seed(5)
    out, ref = x, x
    for _ in range(2):
        ops, neg = ra.draws(len(x), g, x.device)
        out = ra.apply_round(out, ops, neg)
        rows = []
        for i in range(len(x)):
            op = RAND_AUGMENT_OPS[int(ops[i])]
            m = ra.magnitude_of(op, 12, 12) * (-1.0 if (_RA_SPACE[op][1] and bool(neg[i])) else 1.0)
            rows.append(rand_augment_op(ref[i:i + 1], op, m))
        ref = torch.cat(rows)
        assert torch.equal(out, ref)
    # every operation, both signs, on a batch equals the same call image by image
    for op in RAND_AUGMENT_OPS:
        for s in ((1.0, -1.0) if _RA_SPACE[op][1] else (1.0,)):
            m = ra.magnitude_of(op, 12, 12) * s
            assert torch.equal(rand_augment_op(x, op, m), torch.cat([rand_augment_op(x[i:i + 1], op, m) for i in range(len(x))])), op


def test_rand_augment_ops_follow_torchvision_definition():
    import pytest
    from torchvision.transforms import v2

    from kd.data.augment import RAND_AUGMENT_OPS, BatchRandAugment, rand_augment_op
    from kd.data.augment import _RA_SPACE

    tv = v2.RandAugment(num_ops=1, magnitude=9)
    apply = getattr(tv, "_apply_image_or_video_transform", None)
    if apply is None:
        pytest.skip("this torchvision has no per-operation entry point to compare with")
    x = _ra_images(4)
    ra = BatchRandAugment(9, 1)
    assert set(RAND_AUGMENT_OPS) == set(tv._AUGMENTATION_SPACE)
    for op in RAND_AUGMENT_OPS:
        for s in ((1.0, -1.0) if _RA_SPACE[op][1] else (1.0,)):
            m = ra.magnitude_of(op, 12, 12) * s
            want = float(tv._AUGMENTATION_SPACE[op][0](31, 12, 12)[9]) * s if tv._AUGMENTATION_SPACE[op][0](31, 12, 12) is not None else 0.0
            assert m == want, op
            ref = torch.stack([apply(x[i], op, m, interpolation=tv.interpolation, fill=tv._fill) for i in range(len(x))])
            assert torch.equal(rand_augment_op(x, op, m), ref), op


def test_worker_rand_augment_is_reproducible_and_independent_of_workers():
    from kd.data.augment import WorkerAugmentLoader

    x = _ra_images(40)
    y = torch.arange(40) % 10
    tf = BatchTransform(255.0, (0.5,), (0.5,), 2, True)

    def epoch(workers, epoch=1):
        base = TensorLoader(x, y, 8, shuffle=True, drop_last=True, transform=tf, train=True, seed=2)
        ld = WorkerAugmentLoader(base, 9, 2, workers)
        ld.set_epoch(epoch)
        return list(ld)

    a, b, c = epoch(0), epoch(2), epoch(0, epoch=2)
    assert len(a) == 5
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_rand_augment_refuses_float_batches():
    import pytest

    from kd.data.augment import BatchRandAugment
    from kd.errors import KDError

    with pytest.raises(KDError):
        BatchRandAugment(9, 2)(torch.rand(2, 1, 4, 4))


def test_float64_and_float32_inputs_give_float32_batches():
    for dtype in (torch.float64, torch.float32):
        x = torch.rand(6, 1, 5, 5, dtype=dtype)
        tf = BatchTransform(1.0, (0.5,), (0.25,), 1, True)
        for train in (True, False):
            out = tf(x, train, torch.Generator().manual_seed(0))
            assert out.dtype == torch.float32
        ref = augment_batch(x.float(), 1, True, torch.Generator().manual_seed(0)).mul_(tf.mul).add_(tf.add)
        assert torch.equal(tf(x, True, torch.Generator().manual_seed(0)), ref)
