"""The embedded latent spaces (space-to-depth, patch PCA) and the word-level text encoder."""

import hashlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax.autoencoder import PatchPCAAE, SpaceToDepthAE
from sana_jax.data import checker, shapes
from sana_jax.text_encoder import WordTextEncoder


@pytest.fixture(scope="module")
def images():
    return np.stack([shapes.make_sample(0, i).image for i in range(48)])


def test_encode_folds_pixel_blocks_into_channels_in_documented_order():
    ae = SpaceToDepthAE()
    x = np.random.default_rng(0).random((2, 8, 12, 3), dtype=np.float32)
    z = ae.encode(x)
    assert z.shape == (2, 2, 3, 48) and ae.latent_channels == 48 and ae.downsample == 4
    expected = np.empty_like(z)
    scale, shift = ae.scaling_factor, ae.shift_factor
    for i in range(2):
        for j in range(3):
            for dy in range(4):
                for dx in range(4):
                    for k in range(3):
                        pixel = x[:, 4 * i + dy, 4 * j + dx, k]
                        expected[:, i, j, (dy * 4 + dx) * 3 + k] = (2 * pixel - 1 - shift) * scale
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6)


def test_decode_inverts_encode(images):
    ae = SpaceToDepthAE()
    x = images.astype(np.float32) / 255.0
    np.testing.assert_allclose(ae.decode(ae.encode(x)), x, atol=1e-6)
    np.testing.assert_array_equal(np.rint(ae.decode(ae.encode(images)) * 255).astype(np.uint8), images)
    small = SpaceToDepthAE(downsample=2)
    assert small.encode(x).shape == (48, 16, 16, 12)
    np.testing.assert_allclose(small.decode(small.encode(x)), x, atol=1e-6)


def test_decode_clamps_to_the_unit_range():
    ae = SpaceToDepthAE()
    z = np.full((1, 2, 2, 48), 100.0, np.float32)
    z[..., :24] = -100.0
    out = ae.decode(z)
    assert out.min() == 0.0 and out.max() == 1.0


def test_encoder_works_on_jax_arrays_like_on_numpy(images):
    ae = SpaceToDepthAE()
    x = images[:4].astype(np.float32) / 255.0
    z = ae.encode(jnp.asarray(x))
    assert isinstance(z, jnp.ndarray)
    np.testing.assert_allclose(np.asarray(z), ae.encode(x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ae.decode(z)), x, atol=1e-6)


def test_latents_of_the_shapes_domain_have_about_unit_variance(images):
    z = SpaceToDepthAE().encode(images)
    assert abs(float(z.mean())) < 0.15
    assert 0.8 < float(z.std()) < 1.25


def test_autoencoder_rejects_bad_shapes():
    ae = SpaceToDepthAE()
    with pytest.raises(ValueError, match=r"divisible by 4, got \(1, 30, 32, 3\)"):
        ae.encode(np.zeros((1, 30, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"latents \(B, h, w, 48\), got \(1, 8, 8, 32\)"):
        ae.decode(np.zeros((1, 8, 8, 32), np.float32))


def test_patch_pca_spans_the_top_principal_subspace_of_the_domain_patches():
    ae = PatchPCAAE(channels=16, fit_samples=400)
    mean, basis = ae._basis()
    np.testing.assert_allclose(basis.T @ basis, np.eye(16), atol=1e-5)
    # Reference: the SVD of the centred patch matrix (eigh of the covariance in the library).
    renders = np.stack([shapes.make_sample(ae.fit_seed, i).image for i in range(400)])
    patches = renders.reshape(400, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 48)
    patches = (patches / 255.0 * 2 - 1 - 0.71) * 3.0
    centred = patches - patches.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    reference = vt[:16].T
    np.testing.assert_allclose(mean, patches.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(basis @ basis.T, reference @ reference.T, atol=1e-4)
    kept = np.sum(singular[:16] ** 2) / np.sum(singular**2)
    assert kept > 0.95


def test_patch_pca_keeps_what_the_checker_needs(images):
    ae = PatchPCAAE()
    z = ae.encode(images)
    assert z.shape == (48, 8, 8, 16) and ae.latent_channels == 16
    decoded = ae.decode(z)
    prompts = [shapes.make_sample(0, i).prompt for i in range(48)]
    assert all(checker.check(p, im) for p, im in zip(prompts, decoded, strict=True))
    inside = 0.5 * z  # decodes inside [0, 1], so nothing is clamped; encoding again is then a no-op
    np.testing.assert_allclose(ae.encode(ae.decode(inside)), inside, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ae.encode(jnp.asarray(images))), z, atol=1e-4)
    with pytest.raises(ValueError, match=r"channels=49: expected 1 to 48"):
        PatchPCAAE(channels=49)


def _reference_features(prompt, vocabulary, max_length, dim, seed):
    """The documented formula, re-derived: e(w_i) + 0.5 e(w_{i-1}) + 0.25 p_i over sqrt(1.3125)."""
    rng = np.random.default_rng(seed)
    words = rng.standard_normal((len(vocabulary), dim)).astype(np.float32)
    positions = rng.standard_normal((max_length, dim)).astype(np.float32)
    ids = [vocabulary.index(w) for w in prompt.split()]
    out = np.zeros((max_length, dim), np.float32)
    for i, word in enumerate(ids):
        out[i] = words[word] + 0.25 * positions[i] + (0.5 * words[ids[i - 1]] if i else 0)
    return out / np.sqrt(1.3125)


def test_text_features_follow_the_documented_formula():
    encoder = WordTextEncoder(max_length=12, feature_dim=32, seed=5)
    prompts = ["a red circle and a blue square", "three triangles", ""]
    features, mask = encoder.encode_text(prompts)
    assert features.shape == (3, 12, 32) and features.dtype == np.float32
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask.sum(axis=1), [7, 2, 0])
    for row, prompt in enumerate(prompts):
        expected = _reference_features(prompt, list(shapes.VOCABULARY), 12, 32, 5)
        np.testing.assert_allclose(features[row], expected, rtol=1e-5, atol=1e-6)
    assert not features[2].any()  # the null prompt is all padding


def test_text_features_depend_on_word_binding_and_are_case_insensitive():
    encoder = WordTextEncoder()
    features, _ = encoder.encode_text(["a red circle and a blue square", "a blue circle and a red square",
                                       "  A Red Circle And A Blue Square "])
    assert not np.allclose(features[0], features[1])
    np.testing.assert_array_equal(features[0], features[2])


def test_text_encoder_errors_name_the_problem():
    encoder = WordTextEncoder(max_length=4)
    with pytest.raises(ValueError, match="unknown word 'pink' in prompt 'a pink circle'"):
        encoder.encode_text(["a pink circle"])
    with pytest.raises(ValueError, match="has 5 words; at most 4 fit"):
        encoder.encode_text(["a red circle and a"])
    with pytest.raises(TypeError, match="sequence of prompts"):
        encoder.encode_text("a circle")


def _digest(features, mask):
    return hashlib.sha256(features.tobytes() + mask.tobytes()).hexdigest()


def test_text_encoder_is_identical_in_a_fresh_process():
    prompts = ["a red circle and a blue square", "four diamonds", "a triangle above a square"]
    here = _digest(*WordTextEncoder(seed=3).encode_text(prompts))
    code = ("import hashlib; from sana_jax.text_encoder import WordTextEncoder; "
            f"f, m = WordTextEncoder(seed=3).encode_text({prompts!r}); "
            "print(hashlib.sha256(f.tobytes() + m.tobytes()).hexdigest())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here
    assert _digest(*WordTextEncoder(seed=4).encode_text(prompts)) != here
