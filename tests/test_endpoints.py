"""Client-side load spreading (client/endpoints.py) against two real CPU Triton servers on 127.0.0.1.

* round robin: requests alternate between the servers (counted by the pool and by each server's own statistics);
* dns:///NAME:PORT resolves with the system resolver and is re-resolved periodically;
* `leukograph stream --url A,B`: one server SIGKILLed mid-stream, the stream goes on through the other, every frame
  recorded exactly once in SQLite.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_faults import (
    SHM,
    START_TIMEOUT_S,
    STUB_REGION,
    assert_every_frame_once,
    finish,
    kill_server,
    recorded_frames,
    wait_for_frames,
)
from test_stream import LEUKOGRAPH, N_FRAMES, held_out_bgr, write_png_folder

from leukograph.client import contract
from leukograph.client.endpoints import EndpointPool, open_client, parse_urls, resolve
from leukograph.client.localize import localize
from leukograph.client.triton_client import TritonPipelineClient
from leukograph.deploy.server import TritonServer, free_port

pytestmark = pytest.mark.server


@pytest.fixture()
def two_servers(served_repository: Path, tmp_path: Path) -> Iterator[tuple[TritonServer, TritonServer]]:
    """Two started servers of this test on free loopback ports; their leftover stub regions removed afterwards."""
    before = set(SHM.glob(STUB_REGION))
    servers = tuple(TritonServer(served_repository, http_port=free_port(), grpc_port=free_port(),
                                 metrics_port=free_port(), log_path=tmp_path / f"tritonserver-{i}.log")
                    for i in range(2))
    try:
        for server in servers:
            server.start(START_TIMEOUT_S)
        yield servers
    finally:
        for server in servers:
            server.stop()
        for region in set(SHM.glob(STUB_REGION)) - before:
            region.unlink(missing_ok=True)


def inference_count(server: TritonServer) -> int:
    """Requests both ensembles executed (bare frames and frames with boxes), from the server's statistics API."""
    total = 0
    for pipeline in contract.PIPELINES:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{pipeline.name}/stats", timeout=5) as r:
            stats = json.loads(r.read())
        total += sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])
    return total


def frames_with_cells(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _, bgr in held_out_bgr(count):
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        out.append((rgb, localize(rgb).boxes))
    return out


def test_url_forms() -> None:
    assert parse_urls("127.0.0.1:8001") == (["127.0.0.1:8001"], None)
    assert parse_urls(" a:1, b:2 ") == (["a:1", "b:2"], None)
    assert parse_urls("dns:///leukograph-triton.leukograph.svc.cluster.local:8001") == (
        [], ("leukograph-triton.leukograph.svc.cluster.local", 8001))
    for bad in ("dns:///no-port", "dns:///:8001", " , "):
        with pytest.raises(ValueError):
            parse_urls(bad)
    assert "127.0.0.1:8001" in resolve("localhost", 8001)
    assert isinstance(open_client("127.0.0.1:1"), TritonPipelineClient)
    with pytest.raises(ValueError, match="--shm"):
        open_client("127.0.0.1:1,127.0.0.1:2", shm=True)


def test_bad_url_list_is_one_line_error(tmp_path: Path) -> None:
    write_png_folder(tmp_path / "frames", 1)
    result = subprocess.run([*LEUKOGRAPH, "stream", str(tmp_path / "frames"), "--url", "dns:///no-port",
                             "--db", str(tmp_path / "r.sqlite")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "leukograph stream: error: --url: 'dns:///no-port': expected dns:///NAME:PORT"]


def test_round_robin_spreads_requests_over_both_servers(two_servers: tuple[TritonServer, TritonServer]) -> None:
    first, second = two_servers
    frames = frames_with_cells(4)
    before = [inference_count(s) for s in two_servers]
    with TritonPipelineClient(first.grpc_url) as single:
        expected = [single.infer(rgb, boxes) for rgb, boxes in frames]
    with EndpointPool(f"{first.grpc_url},{second.grpc_url}") as pool:
        assert pool.wait_ready(30)
        got = [pool.infer(rgb, boxes) for rgb, boxes in frames * 2]
        assert dict(pool.stats.answered) == {first.grpc_url: 4, second.grpc_url: 4}
    for (probs, labels), (want_probs, want_labels) in zip(got, expected * 2):
        np.testing.assert_allclose(probs, want_probs, atol=1e-5)
        np.testing.assert_array_equal(labels, want_labels)
    # `single` sent its 4 to the first server; the pool sent 4 to each. A server counts a request just after it
    # answers it, so give the last count a moment.
    deadline = time.monotonic() + 10
    while (delta := [inference_count(s) - b for s, b in zip(two_servers, before)]) != [8, 4]:
        assert time.monotonic() < deadline, delta
        time.sleep(0.1)


def test_dns_name_is_resolved_and_re_resolved(triton_server: TritonServer) -> None:
    server = triton_server
    (rgb, boxes), = frames_with_cells(1)
    with EndpointPool(f"dns:///localhost:{server.grpc_port}", resolve_every_s=0.3) as pool:
        assert f"127.0.0.1:{server.grpc_port}" in pool.urls
        assert pool.wait_ready(30)
        resolutions = pool.resolutions
        probs, _ = pool.infer(rgb, boxes)
        assert probs.shape[0] == len(boxes)
        time.sleep(1.0)
        assert pool.resolutions >= resolutions + 2, "the name must be re-resolved periodically"
        assert pool.up_urls() == [f"127.0.0.1:{server.grpc_port}"]


def test_stream_goes_on_through_the_other_server_when_one_is_killed(
        two_servers: tuple[TritonServer, TritonServer], tmp_path: Path) -> None:
    first, second = two_servers
    frames_dir = tmp_path / "frames"
    write_png_folder(frames_dir)
    db, summary_path, sample = tmp_path / "r.sqlite", tmp_path / "s.json", "two-servers"
    before_first = inference_count(first)
    # 4 frames/s: the stream lasts ~2.5 s, long enough to kill one server in the middle of it.
    client = subprocess.Popen([*LEUKOGRAPH, "stream", str(frames_dir), "--url", f"{first.grpc_url},{second.grpc_url}",
                               "--db", str(db), "--sample", sample, "--target", "200", "--max-fps", "4",
                               "--retry-timeout", "60", "--json-summary", str(summary_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_frames(db, sample, 3, client)
    kill_server(second)
    killed_at = recorded_frames(db, sample)
    assert killed_at < N_FRAMES, "the stream ended before the kill; slow it down"
    code, out, err = finish(client)
    assert code == 0, err
    assert f"{second.grpc_url} unavailable" in err and "Traceback" not in err
    summary = json.loads(summary_path.read_text())
    frames = summary["frames"]
    assert frames["recorded"] == N_FRAMES
    assert frames["failed"] == frames["unrecorded"] == frames["dropped"] == 0
    assert_every_frame_once(db, sample, frames_dir)
    # Every frame with cells reached the surviving server, or had reached the killed one before the kill.
    assert inference_count(first) - before_first >= N_FRAMES - killed_at - 1
