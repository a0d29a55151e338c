"""discriminators.py: MPD folding and MRD spectrogram inputs, layer shapes, real/fake handling."""
import contextlib
import warnings

import numpy as np
import pytest
import torch

import discriminators
from conftest import tone


# ---------------------------------------------------------------------------------------------
# MPD and MRD shapes, folding and inputs


def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def test_mpd_shapes_and_fold(full):
    mpd = full["mpd"]
    assert [d.period for d in mpd.discriminators] == [2, 3, 5, 7, 11]
    length, batch = 600, 2
    y = torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(0))
    for d in mpd.discriminators:
        p = d.period
        seen = []
        handle = d.convs[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            score, fmaps = d(y)
        handle.remove()
        padded_len = -(-length // p) * p
        folded = np.pad(y.numpy(), ((0, 0), (0, 0), (0, padded_len - length)), mode="reflect")
        folded = folded.reshape(batch, 1, padded_len // p, p)
        assert seen[0].shape == folded.shape
        np.testing.assert_array_equal(seen[0].numpy(), folded)
        heights = [padded_len // p]
        for _ in range(4):
            heights.append(conv_out(heights[-1], 5, 3, 2))
        expected = [(batch, c, hgt, p) for c, hgt in zip([32, 128, 512, 1024], heights[1:])]
        expected += [(batch, 1024, heights[4], p), (batch, 1, heights[4], p)]
        assert [tuple(f.shape) for f in fmaps] == expected, p
        assert score.shape == (batch, heights[4] * p)
        assert torch.equal(score, fmaps[-1].flatten(1))


def test_mrd_shapes_and_input(full):
    mrd = full["mrd"]
    length, batch = 2400, 2
    y = torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(1))
    for d, (n_fft, hop, win) in zip(mrd.discriminators, [(512, 20, 160), (1024, 40, 320), (2048, 80, 640)]):
        assert d.resolution == (n_fft, hop, win)
        seen = []
        handle = d.convs[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            score, fmaps = d(y)
        handle.remove()
        bins, frames = n_fft // 2 + 1, length // hop + 1
        assert seen[0].shape == (batch, 1, bins, frames)
        with no_warnings():
            ref = torch.stft(y[:, 0], n_fft, hop_length=hop, win_length=win, window=None, center=True,
                             return_complex=True).abs()
        assert torch.allclose(seen[0][:, 0], ref, atol=1e-4, rtol=1e-5)
        shapes = [(bins, frames)]
        for k, s, p in [((7, 5), (2, 2), (3, 2)), ((5, 3), (2, 1), (2, 1)), ((5, 3), (2, 2), (2, 1)),
                        ((3, 3), (2, 1), (1, 1)), ((3, 3), (2, 2), (1, 1))]:
            f, t = shapes[-1]
            shapes.append((conv_out(f, k[0], s[0], p[0]), conv_out(t, k[1], s[1], p[1])))
        expected = [(batch, 64, f, t) for f, t in shapes[1:]] + [(batch, 1, *shapes[-1])]
        assert [tuple(f.shape) for f in fmaps] == expected
        assert score.shape == (batch, shapes[-1][0] * shapes[-1][1])


@contextlib.contextmanager
def no_warnings():
    """torch.stft warns about window=None; the warning is irrelevant here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("resolution", [(512, 20, 160), (1024, 40, 320), (2048, 80, 640)])
def test_mrd_spectrogram_rectangular_window(resolution):
    n_fft, hop, win = resolution
    d = discriminators.DiscriminatorR(resolution, 2)
    x = torch.from_numpy(np.stack([tone(0.06, seed=0), tone(0.06, f0=440.0, seed=1)]))
    with no_warnings():
        none_window = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=None, center=True,
                                 return_complex=True).abs()
    ones_n_fft = torch.stft(x, n_fft, hop_length=hop, window=torch.ones(n_fft), center=True,
                            return_complex=True).abs()
    ours = d.spectrogram(x)
    assert torch.allclose(ours, none_window, atol=1e-4, rtol=1e-5)
    assert (ours - ones_n_fft).abs().max() > 1.0


@pytest.mark.parametrize("together", [True, False])
def test_multi_discriminators_real_and_fake(tiny_h, together):
    torch.manual_seed(0)
    y = torch.randn(2, 1, 2400)
    y_hat = torch.randn(2, 1, 2400)
    # One batch of four may round differently from two batches of two; one at a time is exact.
    same = (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)) if together else torch.equal
    for cls, count in ((discriminators.MultiPeriodDiscriminator, 5), (discriminators.MultiResolutionDiscriminator, 3)):
        md = cls(tiny_h)
        with torch.no_grad():
            real, fake, real_f, fake_f = md(y, y_hat, together=together)
            assert len(real) == len(fake) == len(real_f) == len(fake_f) == count
            for i, d in enumerate(md.discriminators):
                assert same(real[i], d(y)[0]) and same(fake[i], d(y_hat)[0])
                assert len(real_f[i]) == len(fake_f[i]) == 6
                assert same(fake_f[i][2], d(y_hat)[1][2]) and same(real_f[i][5], d(y)[1][5])


def test_real_and_fake_of_different_lengths_run_in_turn(tiny_h):
    """The decoder's output need not have the input's length outside training; then the two
    cannot share a batch, and each runs alone, exactly."""
    torch.manual_seed(0)
    y, y_hat = torch.randn(1, 1, 2400), torch.randn(1, 1, 2320)
    for cls in (discriminators.MultiPeriodDiscriminator, discriminators.MultiResolutionDiscriminator):
        md = cls(tiny_h)
        with torch.no_grad():
            real, fake, _, fake_f = md(y, y_hat)
            for i, d in enumerate(md.discriminators):
                assert torch.equal(real[i], d(y)[0]) and torch.equal(fake_f[i][-1], d(y_hat)[1][-1])


def test_together_gives_the_same_gradients(tiny_h):
    """The discriminator step's real and fake batch in one pass: equal loss and weight gradients,
    and a fake input's gradient that the real half does not reach."""
    from losses import discriminator_loss, feature_matching_loss
    torch.manual_seed(1)
    y = torch.randn(2, 1, 2400)
    for cls in (discriminators.MultiPeriodDiscriminator, discriminators.MultiResolutionDiscriminator):
        md = cls(tiny_h)
        results = []
        for together in (False, True):
            md.zero_grad()
            y_hat = (0.5 * y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
                     ).requires_grad_()
            real, fake, real_f, fake_f = md(y, y_hat, together=together)
            loss = discriminator_loss(real, fake) + feature_matching_loss(real_f, fake_f)
            loss.backward()
            results.append((loss.detach(), y_hat.grad, [p.grad.clone() for p in md.parameters()]))
        (loss_a, input_a, grads_a), (loss_b, input_b, grads_b) = results
        assert torch.allclose(loss_a, loss_b, rtol=1e-6)
        assert input_a.abs().sum() > 0 and torch.allclose(input_a, input_b, rtol=1e-4, atol=1e-7)
        assert len(grads_a) == len(grads_b) > 10 and sum(int(g.abs().sum() > 0) for g in grads_a) > 10
        for a, b in zip(grads_a, grads_b):
            assert (a - b).abs().max() <= 5e-4 * a.abs().max() + 1e-7  # summed in another order


def test_together_issues_fewer_operations(tiny_h):
    """What the discriminator step's single pass is for: on a GPU each operation is a kernel
    the host must issue, and at batch 16 the host is slower than the GPU."""
    from bench import TrafficCounter
    from losses import discriminator_loss
    y = torch.randn(2, 1, 2400)
    for cls in (discriminators.MultiPeriodDiscriminator, discriminators.MultiResolutionDiscriminator):
        md = cls(tiny_h)
        counts = {}
        for together in (False, True):
            with TrafficCounter() as counter:
                discriminator_loss(*md(y, 0.5 * y, together=together)[:2]).backward()
            counts[together] = counter.operations
        assert counts[True] < 0.75 * counts[False], counts
