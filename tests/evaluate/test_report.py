"""report: the protocols of an embedded set against direct calls, the files written, the one JSON
writer (atomic, NaN/inf refused naming the key), and a training run's record and summary."""

import json
import math
import os

import numpy as np
import pytest

from facenet_jax.evaluate import (
    episodes,
    open_set,
    pairs,
    report,
    retrieval,
    similarity_head,
    verification,
)
from facenet_jax.inference import ImageSet
from tests.clusters import clusters


def embedded_set(num_ids=24, per_id=5, groups=2, seed=0) -> ImageSet:
    e, labels = clusters(num_ids, per_id, noise=0.8, seed=seed)
    names = [f"p{k:02d}" for k in range(num_ids)]
    files = [f"{names[k]}/{n}.jpg" for k, n in zip(labels, range(len(labels)), strict=True)]
    group_names = [f"g{g}" for g in range(groups)]
    return ImageSet("faces", files, labels, names, labels % groups, group_names, e)


def test_write_json_is_atomic_sorted_and_converts_numpy(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    record = {"b": np.float32(0.5), "a": [np.int64(3), np.arange(2)], "c": None, "d": True}
    assert report.write_json(path, record) == path
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"a": [3, [0, 1]], "b": 0.5, "c": None, "d": True}
    assert text.index('"a"') < text.index('"b"') and os.listdir(tmp_path / "sub") == ["r.json"]


@pytest.mark.parametrize("bad", [math.nan, np.float64(np.inf), -math.inf])
def test_write_json_refuses_non_finite_values_naming_the_key(tmp_path, bad):
    path = str(tmp_path / "r.json")
    report.write_json(path, {"ok": 1})
    with pytest.raises(ValueError, match=r"r\.json: trained\.folds\[1\] is (nan|inf|-inf)"):
        report.write_json(path, {"trained": {"folds": [0.5, bad]}})
    with open(path) as f:
        assert json.load(f) == {"ok": 1}  # the previous file is untouched
    assert os.listdir(tmp_path) == ["r.json"]


def test_settings_validate_names_and_of_run(smoke_config):
    with pytest.raises(ValueError, match="unknown protocol"):
        report.Settings(protocols=("verification", "speed"))
    with pytest.raises(ValueError, match="impostors"):
        report.Settings(impostors="some")
    s = report.Settings.of_run(smoke_config)
    assert (s.num_pairs, s.num_folds, s.seed) == (200, 5, smoke_config.seed)
    assert s.impostors == "any" and s.protocols == ("verification",)


@pytest.mark.parametrize("impostors", ["group", "any"])
def test_evaluate_set_runs_each_protocol_as_called_directly(impostors):
    s = embedded_set()
    settings = report.Settings(num_pairs=400, num_folds=4, seed=3, impostors=impostors, far=0.05)
    head = similarity_head.fit_similarity_head(*clusters(30, 4, noise=0.8, seed=9), seed=3)
    rep = report.evaluate_set(s, settings, head)
    m = rep.metrics
    within = s.groups if impostors == "group" else None
    i, j, issame = verification.sample_pairs(s.labels, 400, 3, within)
    d = verification.pair_distances(s.embeddings, i, j)
    np.testing.assert_array_equal(rep.distances, d)
    assert m["verification"] == verification.verification_metrics(d, issame, 4, 3)
    assert m["groups"] == verification.group_metrics(
        d, issame, verification.pair_groups(s.groups, i, j), s.group_names
    )
    assert m["retrieval"] == retrieval.retrieval_metrics(s.embeddings, s.labels)
    want_open = open_set.open_set_protocol(s.embeddings, s.labels, 0.05, 1, seed=3)
    assert m["open_set"] == want_open
    scores = similarity_head.head_distances(head, s.embeddings[i], s.embeddings[j])
    assert m["similarity_head"] == verification.verification_metrics(scores, issame, 4, 3)
    assert m["negative_pairs"] == ("within group" if impostors == "group" else "any identity")
    assert (m["num_images"], m["num_identities"]) == (120, 24)


def test_a_runs_protocols_are_verification_only():
    s = embedded_set(groups=2)
    rep = report.evaluate_set(s, report.Settings(num_pairs=100, protocols=("verification",)))
    assert set(rep.metrics) == {"verification", "negative_pairs", "num_images", "num_identities"}
    record = report.run_record(rep)
    assert record == {**rep.verification, "num_images": 120, "num_identities": 24}


def test_write_an_embedded_set_and_a_pairs_file(tmp_path):
    s = embedded_set()
    rep = report.evaluate_set(s, report.Settings(num_pairs=200, far=0.1))
    record = report.write(rep, str(tmp_path / "set"), "step 5", flip=False, fingerprint="m")
    with open(tmp_path / "set" / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(report.jsonable(record)))
    assert record["fingerprint"] == "m" and record["output_dir"] == str(tmp_path / "set")
    names = {os.path.basename(p) for p in record["plots"]}
    assert names == {"roc.png", "distances.png", "embeddings.png"} | {
        "group_accuracy.png",
        "group_far.png",
    }
    assert all(os.path.getsize(p) > 0 for p in record["plots"])

    p = pairs.Pairs(
        [f"img{k}" for k in range(10)],
        np.arange(0, 20) % 10,
        (np.arange(0, 20) + 3) % 10,
        np.arange(20) % 2 == 0,
        np.arange(20) // 10,
        "pairs.txt",
    )
    emb = s.embeddings[:10]
    rep = report.evaluate_pairs(emb, p, report.Settings())
    want = pairs.protocol_metrics(verification.pair_distances(emb, p.i, p.j), p.issame, p.fold)
    assert {k: rep.metrics[k] for k in want} == want
    assert rep.metrics["pairs_file"] == "pairs.txt" and rep.metrics["num_images"] == 10
    record = report.write(rep, str(tmp_path / "pairs"), "untrained")
    assert {os.path.basename(q) for q in record["plots"]} == {"roc.png", "distances.png"}
    z = np.load(tmp_path / "pairs" / "pairs.npz")
    np.testing.assert_array_equal(z["distances"], rep.distances)
    np.testing.assert_array_equal(z["fold"], p.fold)


def test_run_episodes_writes_its_json(tmp_path):
    s = embedded_set()
    out = report.run_episodes(s, str(tmp_path), 5, 1, 30, 2, seed=4, root="faces")
    assert {k: out[k] for k in ("accuracy", "ci95")} == {
        k: episodes.episodes(s.embeddings, s.labels, 5, 1, 30, 2, 4)[k]
        for k in ("accuracy", "ci95")
    }
    with open(tmp_path / "episodes_5way_1shot.json") as f:
        assert json.load(f)["root"] == "faces" and out["num_images"] == 120


def test_write_run_eval_json_plots_threshold_and_summary(tmp_path):
    trained = report.evaluate_set(embedded_set(seed=1), report.Settings(protocols=()))
    untrained = report.evaluate_set(embedded_set(seed=2), report.Settings(protocols=()))
    final = report.run_record(trained) | {"step": 7}
    baseline = report.run_record(untrained) | {"roc": report.roc(untrained)}
    far, tar, _ = verification.roc_curve(untrained.distances, untrained.issame)
    assert baseline["roc"] == {"far": far.tolist(), "tar": tar.tolist()}
    report.write_run(str(tmp_path), trained, final, baseline)
    with open(tmp_path / "eval.json") as f:
        saved = json.load(f)
    assert saved == {
        "trained": final,
        "untrained": {k: v for k, v in baseline.items() if k != "roc"},
    }
    assert {"roc.png", "distances.png", "embeddings.png"} <= set(os.listdir(tmp_path))
    assert report.run_threshold(str(tmp_path)) == final["threshold"]
    with pytest.raises(ValueError, match="pass --threshold"):
        report.run_threshold(str(tmp_path / "nowhere"))
    text = report.summary(final, baseline, "test")
    assert text.splitlines()[0] == "verification on split 'test' (24 identities)"
    assert f"accuracy {final['accuracy']:.4f}" in text.splitlines()[2]
    assert "untrained" in text.splitlines()[1]
    assert "untrained" not in report.summary(final, None, "test")
