"""``hf:ORG/NAME``: a release in a local Hugging Face cache, built here in the hub's real layout
(``models--ORG--NAME/{refs/main, snapshots/COMMIT/* -> ../../blobs/*, blobs/}``) from the tiny
TiTok release of tests/data, converted once into ``$TITOK_JAX_CACHE`` and loaded like a workdir by
``load_tokenizer`` and every command; nothing is downloaded and nothing is written outside
``$TITOK_JAX_CACHE`` and the outputs asked for."""
import hashlib
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import titok_jax
from titok_jax import cli

from train_helpers import ROOT, one_line_error, tree_digest

RELEASE = os.path.join(ROOT, "tests", "data", "titok", "vq")
VQGAN = os.path.join(ROOT, "tests", "data", "vqgan")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_repo(hub, repo, files, commit=COMMIT, refs=("main",)):
    """Put ``files`` ({name in the repo: source file}) in ``hub`` as ``huggingface-cli download``
    leaves them: content-addressed blobs, a snapshot of relative symlinks, refs naming the commit."""
    folder = os.path.join(hub, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
    snap = os.path.join(folder, "snapshots", commit)
    for name, src in files.items():
        with open(src, "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(folder, "blobs", blob), "wb") as f:
            f.write(data)
        link = os.path.join(snap, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(folder, "blobs", blob), os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
        with open(os.path.join(folder, "refs", ref), "w") as f:
            f.write(commit)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A Hugging Face cache holding ``org/name`` (the tiny TiTok: config.json + model.safetensors +
    a README), ``org/mirror`` (two bare state dicts, as fun-research/TiTok holds several .bin
    files) and ``org/partial`` (no weights); ``HF_HUB_CACHE``, ``TITOK_JAX_CACHE`` and ``HOME``
    point into a temporary folder."""
    root = tmp_path_factory.mktemp("hf")
    hub, cache, home = str(root / "hub"), str(root / "cache"), str(root / "home")
    readme = root / "README.md"
    readme.write_text("---\nlicense: apache-2.0\n---\n")
    add_repo(hub, "org/name", {"config.json": os.path.join(RELEASE, "config.json"),
                               "model.safetensors": os.path.join(RELEASE, "model.safetensors"),
                               "README.md": str(readme)})
    add_repo(hub, "org/mirror", {"vqgan.safetensors": os.path.join(VQGAN, "vqgan_state.safetensors"),
                                 "disc.safetensors": os.path.join(VQGAN, "disc_state.safetensors")},
             commit="f" * 40)
    add_repo(hub, "org/partial", {"config.json": os.path.join(RELEASE, "config.json")},  # an hf_hub_download
             commit="e" * 40)                                                         # of config.json only
    mp = pytest.MonkeyPatch()
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        mp.delenv(var, raising=False)
    mp.setenv("HF_HUB_CACHE", hub)
    mp.setenv("TITOK_JAX_CACHE", cache)
    mp.setenv("HOME", home)
    yield {"root": str(root), "hub": hub, "cache": cache, "home": home, "hub_digest": tree_digest(hub)}
    mp.undo()


def converted(env, leaf=COMMIT, repo="org--name"):
    return os.path.join(env["cache"], "hf", repo, leaf)


def test_load_tokenizer_matches_the_imported_release_and_converts_once(env, vq_release_dir, monkeypatch):
    import jax

    tok = titok_jax.load_tokenizer("hf:org/name", batch_size=4)
    ref = titok_jax.load_tokenizer(vq_release_dir, batch_size=4)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tokens = tok.encode(x)
    np.testing.assert_array_equal(tokens, ref.encode(x))
    np.testing.assert_array_equal(tok.decode(tokens), ref.decode(tokens))
    same_params = lambda a: jax.tree.all(jax.tree.map(  # noqa: E731
        lambda p, q: bool(np.array_equal(p, q)), a.params, ref.params))
    workdir = converted(env)
    marker = os.path.join(workdir, ".hf_source.json")
    assert os.path.isfile(marker) and os.path.isfile(os.path.join(workdir, "config.json"))
    from titok_jax.tasks.runs import read_run_config
    assert read_run_config(workdir).source == f"hf:org/name@{COMMIT}"
    assert sorted(os.listdir(os.path.dirname(workdir))) == [COMMIT]  # no temporary left behind

    # Reused, never converted again: the importer would fail, the marker keeps its mtime.
    import titok_jax.convert.workdir as importer

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(importer, "import_torch", refuse)
    before = os.stat(marker).st_mtime_ns
    for name in ("hf:org/name", "hf://org/name", "hf:org/name@main", f"hf:org/name@{COMMIT}"):
        assert same_params(titok_jax.load_tokenizer(name))
    assert os.stat(marker).st_mtime_ns == before
    assert tree_digest(env["hub"]) == env["hub_digest"]  # the Hugging Face cache is only read
    assert not os.path.exists(env["home"])                # no default cache was used


def test_cli_reconstruct_and_generate_flags_take_hf_names(env, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    assert cli.main(["reconstruct", "--workdir", "hf:org/name", "--input", str(image),
                     "--output", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)  # the same model: see the test above
    assert sorted(os.listdir(tmp_path)) == ["in.png", "out.png"]
    # every --workdir / --tokenizer flag is resolved where the flags are parsed
    from absl import flags

    from titok_jax.commands.common import parse

    def define(fv):
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        flags.DEFINE_string("tokenizer", None, "", flag_values=fv)

    fv = parse("titok-jax generate", ["--workdir", "hf:org/name", "--tokenizer=hf:org/name@main"], define)
    assert fv.workdir == fv.tokenizer == converted(env)
    assert sorted(os.listdir(os.path.join(env["cache"], "hf"))) == ["org--name"]
    assert tree_digest(env["hub"]) == env["hub_digest"]


@pytest.mark.parametrize("name, expect", [
    ("hf:org/absent", "`huggingface-cli download org/absent`"),
    ("hf:org/name@v2", "`huggingface-cli download org/name --revision v2`"),
    ("hf:org/name/other.safetensors", "`huggingface-cli download org/name other.safetensors`"),
    ("hf:org/partial", "the weights of org/partial"),
])
def test_missing_repository_revision_or_file_is_one_line(env, tmp_path, capsys, name, expect):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = cli.main(["reconstruct", "--workdir", name, "--input", str(image), "--output",
                     str(tmp_path / "out.png")])
    err = one_line_error(capsys)
    assert code == 1 and expect in err and "not in the local Hugging Face cache" in err, err
    assert "HF_HUB_CACHE" in err
    with pytest.raises(FileNotFoundError, match="never downloads"):
        titok_jax.load_tokenizer(name)
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_bad_names_and_train_refuse_in_one_line(env, capsys):
    for bad in ("hf:org", "hf:org/../x", "hf:org/name@", "hf:org/name/../../x"):
        with pytest.raises(ValueError, match="not a Hugging Face repository name"):
            titok_jax.load_tokenizer(bad)
    config = os.path.join(ROOT, "configs", "titok.py") + ":tiny"
    assert cli.main(["train", "--config", config, "--workdir", "hf:org/name"]) == 2
    assert "writes its workdir" in one_line_error(capsys)


def test_a_repository_of_several_weights_needs_a_file(env, capsys):
    with pytest.raises(ValueError, match="several weights files .*hf:org/mirror/disc.safetensors"):
        titok_jax.load_tokenizer("hf:org/mirror")
    tok = titok_jax.load_tokenizer("hf:org/mirror/vqgan.safetensors")  # a bare MaskGIT-VQGAN state dict
    assert tok.config.model.name == "maskgit_vqgan"
    assert os.path.isfile(os.path.join(converted(env, "f" * 40 + "--vqgan.safetensors", "org--mirror"),
                                       ".hf_source.json"))
    assert [n for n in os.listdir(os.path.join(env["cache"], "hf")) if n.startswith(".")] == []
    assert tree_digest(env["hub"]) == env["hub_digest"]


def test_import_torch_reads_the_cache(env, tmp_path):
    out = tmp_path / "workdir"
    assert cli.main(["import-torch", "--input", f"hf:org/name@{COMMIT}", "--output", str(out)]) == 0
    assert os.path.isfile(out / "config.json") and not os.path.exists(out / ".hf_source.json")
    shutil.rmtree(out)
