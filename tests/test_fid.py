"""rFID / IS: the pytorch-fid InceptionV3 (vs stored reference features on seeded random weights), its
converter, the Fréchet distance (vs independent float64 computations), the streaming statistics, the
Inception Score, reference-stats files, and rFID in the evaluation loop."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from titok_jax import cli
from titok_jax.convert import inception as conv
from titok_jax.evaluation import fid
from titok_jax.nets.inception import (InceptionV3FID, inception_feature_fn,
                                      load_inception_params)
from titok_jax.nn.resize import resize_bilinear

DATA = os.path.join(os.path.dirname(__file__), "data", "fid")


def _vectors_module():
    spec = importlib.util.spec_from_file_location("fid_make_vectors",
                                                  os.path.join(DATA, "make_vectors.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def torch_sd():
    """Seeded random weights under pytorch-fid's state-dict keys (+ BN counters, as torch saves)."""
    sd = _vectors_module().random_state_dict(conv.inception_name_table())
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.float32)
    return sd


@pytest.fixture(scope="module")
def weights_file(torch_sd, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "inception_fid.safetensors")
    save_file(dict(torch_sd), path.replace(".safetensors", "_torch.safetensors"))
    assert cli.main(["convert-inception", "--input", path.replace(".safetensors", "_torch.safetensors"),
                     "--output", path]) == 0
    return path


# ----------------------------------------------------------------------------- network
def test_resize_matches_torch_interpolate():
    v = np.load(os.path.join(DATA, "resize_vectors.npz"))
    for i in range(4):
        x, y, aa = v[f"x{i}"], v[f"y{i}"], bool(v[f"aa{i}"])
        got = np.asarray(resize_bilinear(jnp.asarray(x), y.shape[1:3], antialias=aa))
        np.testing.assert_allclose(got, y, atol=2e-6, err_msg=f"case {i} (antialias={aa})")


def test_inception_matches_pytorch_fid_features(weights_file):
    params = load_inception_params(weights_file)
    v = np.load(os.path.join(DATA, "inception_vectors.npz"))
    model = InceptionV3FID()
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    for name in ("small", "large"):          # 48x48 (upsampled) and 331x331 (downsampled) inputs
        out = apply(params, jnp.asarray(v[f"{name}_images"], jnp.float32) / 255.0)
        for key, ref in (("pool", v[f"{name}_pool"]), ("logits", v[f"{name}_logits"])):
            got = np.asarray(out[key])
            assert got.shape == ref.shape
            rel = np.abs(got - ref).max() / np.abs(ref).max()
            assert rel < 1e-4, (name, key, rel)
        bias = np.asarray(params["fc"]["bias"])
        np.testing.assert_allclose(np.asarray(out["logits_unbiased"]) + bias,
                                   np.asarray(out["logits"]), atol=1e-4)


def test_converter_consumes_everything_and_names_problems(torch_sd, weights_file):
    table = conv.inception_name_table()
    assert len(table) == 94 * 5 + 2                  # 94 conv+BN units, fc weight + bias
    n = sum(int(np.prod(s)) for _, _, s in table)
    assert n == 23_885_392                           # 21.8M trunk + 2048 x 1008 + 1008 head
    flat = conv.convert_inception_state_dict(torch_sd)
    w = torch_sd["Mixed_6b.branch7x7_2.conv.weight"]           # [out, in, 1, 7] -> [1, 7, in, out]
    np.testing.assert_array_equal(flat["Mixed_6b/branch7x7_2/conv/kernel"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["fc/kernel"], torch_sd["fc.weight"].T)
    np.testing.assert_array_equal(flat["Mixed_7c/branch_pool/bn/var"],
                                  torch_sd["Mixed_7c.branch_pool.bn.running_var"])
    loaded = load_inception_params(weights_file)
    np.testing.assert_array_equal(np.asarray(loaded["Conv2d_1a_3x3"]["conv"]["kernel"]),
                                  flat["Conv2d_1a_3x3/conv/kernel"])

    missing = {k: v for k, v in torch_sd.items() if k != "Mixed_7b.branch3x3_2a.bn.running_mean"}
    with pytest.raises(ValueError, match="Mixed_7b.branch3x3_2a.bn.running_mean"):
        conv.convert_inception_state_dict(missing)
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        conv.convert_inception_state_dict({**torch_sd, "AuxLogits.fc.weight": np.zeros((2, 2))})
    bad = dict(torch_sd, **{"fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(ValueError, match="fc.bias.*shape"):
        conv.convert_inception_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="convert.inception"):
        load_inception_params(weights_file + ".missing.safetensors")


def test_convert_inception_and_fid_reference_commands_refuse_bad_input(torch_sd, weights_file,
                                                                       tmp_path, capsys):
    def one_line(code, argv):
        assert cli.main(argv) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    bad = str(tmp_path / "bad.safetensors")
    save_file({k: v for k, v in torch_sd.items() if k != "fc.bias"}, bad)
    out = tmp_path / "out.safetensors"
    assert "fc.bias" in one_line(1, ["convert-inception", "--input", bad, "--output", str(out)])
    assert not out.exists()
    assert "--output" in one_line(2, ["convert-inception", "--input", bad])
    # fid-reference: dashed flags are accepted too; a missing weights file is one line naming it
    missing = str(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in one_line(1, ["fid-reference", "--data", "sample", "--image-size", "32",
                                              "--inception-weights", missing, "--output",
                                              str(tmp_path / "ref.npz")])
    assert "--inception_weights" in one_line(2, ["fid-reference", "--data", "sample",
                                                 "--output", str(tmp_path / "ref.npz")])
    assert "--batch_size" in one_line(2, ["fid-reference", "--data", "sample", "--batch_size", "0",
                                          "--inception_weights", weights_file, "--output", "r.npz"])
    assert not (tmp_path / "ref.npz").exists()


# ----------------------------------------------------------------------------- statistics
def _fid_eig(mu1, s1, mu2, s2):
    """Independent: tr sqrt(S1 S2) from the eigenvalues of the non-symmetric product."""
    lam = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(lam.real, 0, None))))


def test_frechet_distance_against_independent_computations():
    rng = np.random.default_rng(0)
    d = 24
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.2 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = _fid_eig(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ref, rel=1e-9)
    # diagonal covariances by hand: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    da, db = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert fid.frechet_distance(m1, np.diag(da), m2, np.diag(db)) == pytest.approx(5.0 + 1.0 + 1.0)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(mu1, s1, mu2[:-1], s2)
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_singular_covariances_use_the_eps_fix():
    # rank-1 covariances: sqrtm of a singular product; finite, equal to the eigen route
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = np.outer(u, u), np.outer(v, v)
    got = fid.frechet_distance(np.zeros(5), s1, np.ones(5), s2)
    assert np.isfinite(got)
    assert got == pytest.approx(_fid_eig(np.zeros(5), s1, np.ones(5), s2), rel=1e-5)


def _projected_fid(real, fake, extra_mu=None):
    """Independent of the low-rank route: FID is invariant under an orthonormal change of basis, and
    both covariances and the mean difference live in the span of the feature rows, so project onto
    an orthonormal basis Q of that span and use scipy's sqrtm there."""
    mu1 = real.mean(0) if extra_mu is None else extra_mu
    q, _ = np.linalg.qr(np.concatenate([real, fake]).T)
    s1, s2 = np.cov(real @ q, rowvar=False), np.cov(fake @ q, rowvar=False)
    return fid.frechet_distance(mu1 @ q, s1, fake.mean(0) @ q, s2, method="sqrtm")


def test_low_rank_route_equals_full_computation():
    rng = np.random.default_rng(4)
    d = 40
    real = rng.standard_normal((5, d)) * 2 + 1
    fake = real[:4] + 0.5 * rng.standard_normal((4, d))
    a, b = fid.FeatureStats(d), fid.FeatureStats(d)
    a.update(real[:3])
    a.update(real[3:])
    b.update(fake)
    exact = _projected_fid(real, fake)
    # both factors: the trace of sqrt(M) of a rank-4 M sums square roots of its eigenvalues, and the
    # ones that are zero in exact arithmetic come out at ~1e-16 here, so ~1e-8 absolute noise each
    assert fid.frechet_distance_stats(a, b) == pytest.approx(exact, rel=1e-7)
    assert fid.frechet_distance_stats(a.result(), b) == pytest.approx(exact, rel=1e-7)   # one factor
    # the full D x D routes agree up to the noise sqrt() amplifies at the zero eigenvalues
    for method in ("eigh", "sqrtm"):
        full = fid.frechet_distance(*a.result(), *b.result(), method=method)
        assert full == pytest.approx(exact, rel=1e-5)
        assert fid.frechet_distance_stats(a.result(), b.result(), method=method) == full
    small = fid.FeatureStats(d, keep_rows=3)                  # rows dropped past keep_rows
    small.update(real)
    assert small.factor() is None
    np.testing.assert_allclose(a.factor() @ a.factor().T, a.cov(), atol=1e-12)


def test_feature_stats_stream_equals_numpy_on_all_rows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 6)) * 3 + 5
    keep = rng.random(37) > 0.3
    stats = fid.FeatureStats(6)
    for lo in range(0, 37, 10):
        stats.update(x[lo:lo + 10].astype(np.float32), mask=keep[lo:lo + 10])
    mu, sigma = stats.result()
    xs = x[keep].astype(np.float32).astype(np.float64)
    assert stats.n == keep.sum()
    np.testing.assert_allclose(mu, xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xs, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        s = fid.FeatureStats(6)
        s.update(x[:1])
        s.cov()
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        stats.update(x[:, :5])


def test_reference_stats_roundtrip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    path = str(tmp_path / "ref.npz")
    fid.save_reference_stats(path, mu, sigma)
    got_mu, got_sigma = fid.load_reference_stats(path, dim=3)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(ValueError, match="D = 2048"):
        fid.load_reference_stats(path, dim=2048)
    np.savez(str(tmp_path / "bad.npz"), mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_reference_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fid.load_reference_stats(str(tmp_path / "nope.npz"))


def test_inception_score():
    assert fid.inception_score(np.zeros((6, 10)))[0] == pytest.approx(1.0)     # uniform posteriors
    confident = np.full((4, 10), -50.0)
    confident[np.arange(4), [0, 3, 5, 9]] = 50.0                                 # 4 distinct classes
    assert fid.inception_score(confident)[0] == pytest.approx(4.0, rel=1e-6)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((12, 7)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for part in (p[:4], p[4:8], p[8:]):                    # independent: H(p_y) - mean H(p(y|x))
        py = part.mean(0)
        scores.append(np.exp(-(py * np.log(py)).sum() + (part * np.log(part)).sum(1).mean()))
    mean, std = fid.inception_score(z, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(z, splits=13)


# ----------------------------------------------------------------------------- evaluation wiring
def test_rfid_in_evaluation_and_reference_stats_cli(weights_file, tmp_path):
    from train_helpers import micro_config

    from titok_jax.tasks import get_task
    from titok_jax.train import sharding as sharding_lib
    from titok_jax.tasks.eval_reconstruction import eval_fn, reconstruction_metrics

    ref_path = str(tmp_path / "ref.npz")
    # reference statistics of the eval split's originals, written by the command line
    assert cli.main(["fid-reference", "--data", "sample", "--image_size", "32", "--batch_size", "3",
                     "--inception_weights", weights_file, "--output", ref_path]) == 0
    config = micro_config()
    with config.unlocked():
        # one data shard, so the eval batch is the 3 sample images without padding (less CPU time)
        config.mesh = {"data": 1, "fsdp": 1, "tensor": -1}
        config.data.eval_batch_size = 3
        config.eval = {"inception_weights": weights_file, "fid_reference": ref_path}
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    task = get_task(config)
    params, state = task.init(jax.random.key(0))
    metrics, originals, recs = reconstruction_metrics(eval_fn(task), params["model"], state["model"],
                                                      config, mesh, 32)
    assert np.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0
    assert metrics["inception_score"] >= 1.0 - 1e-9

    # the same number from features computed directly
    feats = inception_feature_fn()
    p = load_inception_params(weights_file)
    real, fake = (np.asarray(feats(p, jnp.asarray(x))["pool"], np.float64)
                  for x in (originals, recs))
    assert real.shape == (3, 2048)                      # the 3 "sample" eval images, no padding
    mu_r, _ = fid.load_reference_stats(ref_path)
    np.testing.assert_allclose(mu_r, real.mean(0), rtol=1e-4, atol=1e-4)
    assert metrics["rfid"] == pytest.approx(_projected_fid(real, fake, extra_mu=mu_r), rel=1e-4)

    # without an `eval` section: no rFID, nothing loaded
    with config.unlocked():
        del config["eval"]
    plain, _, _ = reconstruction_metrics(eval_fn(task), params["model"], state["model"], config, mesh, 32)
    assert "rfid" not in plain and plain["psnr"] == pytest.approx(metrics["psnr"])


def test_generation_scorer_equals_direct_features(weights_file, tmp_path):
    """gFID / IS of `titok-jax generate --inception_weights`: the scorer streamed over two chunks
    equals the Frechet distance and Inception Score of the features computed in one go."""
    from titok_jax.generation import GenerationScorer
    from titok_jax.nets.inception import inception_feature_fn, load_inception_params
    rng = np.random.default_rng(5)
    images = rng.uniform(size=(4, 32, 32, 3)).astype(np.float32)
    ref_mu, ref_a = rng.normal(size=2048), rng.normal(size=(2048, 6))
    ref_sigma = ref_a @ ref_a.T / 6 + 1e-3 * np.eye(2048)
    ref = str(tmp_path / "ref.npz")
    fid.save_reference_stats(ref, ref_mu, ref_sigma)
    scorer = GenerationScorer(weights_file, ref)
    scorer.update(images[:3])
    scorer.update(images[3:])
    got = scorer.result(splits=2)
    out = inception_feature_fn()(load_inception_params(weights_file), images)
    feats = np.asarray(out["pool"], np.float64)
    want_fid = _fid_eig(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma)
    want_is, _ = fid.inception_score(np.asarray(out["logits_unbiased"]), splits=2)
    assert abs(got["gfid"] - want_fid) <= 1e-4 * max(1.0, abs(want_fid)), (got["gfid"], want_fid)
    assert abs(got["inception_score"] - want_is) < 1e-6


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
