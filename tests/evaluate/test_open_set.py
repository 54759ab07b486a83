"""Open-set identification: the enrolled/stranger split, the report against a loop, the protocol."""

import numpy as np
import pytest

from facenet_jax import identification as ident
from facenet_jax.evaluate import open_set
from tests.clusters import clusters


def test_open_set_report_against_loop():
    e, labels = clusters(10, 4, noise=0.9, seed=5)
    names = np.array([f"id{k}" for k in labels])
    enrol_idx, known, strangers = open_set.split_open_set(labels, 1, 0.5, seed=0)
    assert len(enrol_idx) == 5 and len(set(labels[enrol_idx])) == 5
    assert not set(labels[strangers]) & set(labels[enrol_idx])
    assert set(labels[known]) == set(labels[enrol_idx])
    assert len(set(enrol_idx) | set(known) | set(strangers)) == 40
    g = ident.enrol(e[enrol_idx], names[enrol_idx], threshold=0.6)
    probes = np.concatenate([known, strangers])
    rep = open_set.open_set_report(g, e[probes], names[probes])
    top1, dir_, frr, far = [], [], [], []
    for p in probes:
        d = [float(np.sum((e[p] - t) ** 2)) for t in g.embeddings]
        k = int(np.argmin(d))
        ok, acc = g.names[k] == names[p], d[k] <= 0.6
        if names[p] in g.names:
            top1.append(ok)
            dir_.append(ok and acc)
            frr.append(not acc)
        else:
            far.append(acc)
    assert rep["top1_accuracy"] == pytest.approx(np.mean(top1))
    assert rep["detection_identification_rate"] == pytest.approx(np.mean(dir_))
    assert rep["false_reject_rate"] == pytest.approx(np.mean(frr))
    assert rep["stranger_far"] == pytest.approx(np.mean(far))
    assert rep["num_stranger_probes"] == len(strangers) == 20


def test_open_set_protocol_separable():
    e, labels = clusters(200, 3, noise=0.3, seed=6)
    rep = open_set.open_set_protocol(e, labels, target_far=1e-3, shots=1)
    assert rep["top1_accuracy"] == 1.0 and rep["detection_identification_rate"] == 1.0
    assert rep["calibration_far_reached"] <= 1e-3 and rep["num_enrolled"] == 50
    # A stranger is accepted if any of the 50 templates is within the threshold: about
    # 1 - (1 - FAR)^50 = 0.05 here, far below the 1.0 of an uncalibrated (infinite) threshold.
    assert rep["stranger_far"] < 0.25


def test_fpir_calibration_holds_the_stranger_rate_where_per_comparison_far_does_not():
    # 75 enrolled people, 1 shot each: a threshold for a 5% per-comparison FAR accepts almost
    # every stranger (~1 - 0.95^75); calibrated for FPIR it accepts ~5% of held-out strangers.
    e, labels = clusters(300, 4, noise=0.6, seed=3)
    rep = open_set.open_set_protocol(e, labels, target_far=0.05, shots=1)
    assert rep["stranger_far"] > 0.5
    fpir = rep["fpir_calibrated"]
    assert fpir["calibration_fpir_reached"] <= 0.05
    assert fpir["stranger_fpir"] < 0.1
    assert fpir["threshold"] < rep["threshold"]


def test_rates_of_an_empty_probe_set_are_none_not_nan():
    g = ident.enrol(np.eye(3), ["a", "b", "c"], threshold=0.5)  # not calibrated: no target FAR
    rep = open_set.open_set_report(g, np.eye(3)[:2], ["a", "b"])  # no strangers
    assert rep["stranger_far"] is None and rep["target_far"] is None
    assert rep["top1_accuracy"] == 1.0 and rep["num_stranger_probes"] == 0
