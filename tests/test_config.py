"""streams.yaml: schema, line-numbered errors, secrets, redaction, reload diffs (real files)."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
from pathlib import Path

import pytest
from codetr_stream.compile.coco_classes import COCO_CLASSES
from codetr_stream.daemon.config import secrets
from codetr_stream.daemon.config.load import ConfigError, diff, load_config
from codetr_stream.daemon.config.problems import inner_model
from codetr_stream.daemon.config.schema import DaemonConfig, StreamConfig, resolve_class_ids
from codetr_stream.daemon.config.secrets import RedactingFormatter, redact
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_ENV = {"ENTRANCE_PASSWORD": "s3cret-entrance", "DOCK_USER": "dock",
               "DOCK_PASSWORD": "s3cret-dock"}


def write(tmp_path: Path, text: str, name: str = "streams.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(path: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [(p.line, p.field, p.message) for p in info.value.problems]


def test_example_streams_yaml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(key, value)
    config = load_config(ROOT / "streams.yaml")
    assert [s.name for s in config.enabled_streams] == ["entrance", "loading-dock"]
    assert config.publish.endpoint.startswith("tcp://127.0.0.1:")
    assert config.health.host == "127.0.0.1"
    assert "s3cret-dock" in config.streams[1].url
    assert config.engine.path == ROOT / "engines/co_dino_swin_l"


def _keys(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for info in model.model_fields.values():
        if inner := inner_model(info.annotation):
            names |= _keys(inner)
    return names


def test_example_streams_yaml_documents_every_knob() -> None:
    text = (ROOT / "streams.yaml").read_text()
    written = set(re.findall(r"^\s*(?:- )?([a-z_]+):", text, flags=re.MULTILINE))
    assert _keys(DaemonConfig) - written == set()


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        engine:
          path: engines/tiny
        batching:
          max_bacth: 4
        streams:
          - name: cam1
            url: rtsp://10.0.0.5/stream1
            transport: tpc
          - name: cam.2
            url: rtsp://10.0.0.6/
            min_score: 2
          - url: rtsp://10.0.0.7/
          - name: cam1
            url: ftp://10.0.0.8/
    """)
    assert problems(path) == [
        (4, "batching.max_bacth", "unknown key"),
        (8, "streams[0].transport", "Input should be 'tcp' or 'udp'"),
        (9, "streams[1].name", "'cam.2' is not a valid stream name: use 1-64 letters, digits, "
            "'_' or '-', starting with a letter or digit"),
        (11, "streams[1].min_score", "Input should be less than or equal to 1"),
        (12, "streams[2].name", "required, missing"),
        (13, "streams[3].name", "duplicate stream name 'cam1'"),
        (14, "streams[3].url", "unsupported scheme 'ftp'; use rtsp://, rtsps:// or file://"),
    ]


def test_hints_suggest_the_key_meant_or_explain_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, """
        engine: {path: e, gpus: [0]}
        streams:
          - {nmae: cam1, url: rtsp://h/, transport: tpc}
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    hints = {p.field: p.hint for p in info.value.problems}
    assert hints["streams[0].nmae"] == "did you mean 'name'?"
    assert "tcp" in hints["streams[0].transport"] and "udp" in hints["streams[0].transport"]
    text = str(info.value)
    assert f"{path}:3: streams[0].nmae: unknown key (hint: did you mean 'name'?)" in text


def test_yaml_syntax_error_and_duplicate_keys_have_lines(tmp_path: Path) -> None:
    broken = write(tmp_path, """
        engine:
          path: e
        streams: [
    """, "broken.yaml")
    [(line, field, message)] = problems(broken)
    assert line is not None and line >= 3 and field == "" and message.startswith("invalid YAML")

    dupes = write(tmp_path, """
        engine:
          path: e
          path: f
    """, "dupes.yaml")
    assert problems(dupes) == [(3, "engine.path", "duplicate key (first on line 2)")]


def test_missing_required_section_and_unreadable_file(tmp_path: Path) -> None:
    assert problems(write(tmp_path, "streams: []\n")) == [(1, "engine", "required, missing")]
    assert problems(write(tmp_path, "- a list\n", "list.yaml"))[0][2].startswith("the file must")
    [(line, _, message)] = problems(tmp_path / "absent.yaml")
    assert line is None and "cannot read" in message


def test_env_substitution_and_every_missing_variable_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAM_USER", "viewer")
    monkeypatch.delenv("CAM_PASS", raising=False)
    monkeypatch.delenv("CAM_HOST", raising=False)
    path = write(tmp_path, """
        engine: {path: e}
        streams:
          - name: cam1
            url: rtsp://${CAM_USER}:${CAM_PASS}@${CAM_HOST}/s
    """)
    [(line, field, message)] = problems(path)
    assert (line, field) == (4, "streams[0].url")
    assert "${CAM_PASS} is not set" in message and "${CAM_HOST} is not set" in message
    assert "CAM_USER" not in message

    monkeypatch.setenv("CAM_PASS", "pa55word")
    monkeypatch.setenv("CAM_HOST", "10.1.2.3")
    assert load_config(path).streams[0].url == "rtsp://viewer:pa55word@10.1.2.3/s"


def test_secrets_from_credentials_directory_docker_secrets_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds, docker = tmp_path / "creds", tmp_path / "run-secrets"
    creds.mkdir()
    docker.mkdir()
    (creds / "streams_CAM1_PASS").write_text("from-systemd\n")  # LoadCredential=streams:DIR
    (docker / "CAM2_PASS").write_text("from-docker\n")
    (tmp_path / "cam3.secret").write_text("from-file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setattr(secrets, "DOCKER_SECRETS", docker)
    for name in ("CAM1_PASS", "CAM2_PASS"):
        monkeypatch.delenv(name, raising=False)
    path = write(tmp_path, f"""
        engine: {{path: e}}
        streams:
          - {{name: c1, url: "rtsp://u:${{CAM1_PASS}}@h/"}}
          - {{name: c2, url: "rtsp://u:${{CAM2_PASS}}@h/"}}
          - {{name: c3, url: "rtsp://u:${{file:{tmp_path}/cam3.secret}}@h/"}}
          - {{name: c4, url: "file:///clips/$${{literal}}.mp4"}}
    """)
    urls = [s.url for s in load_config(path).streams]
    assert urls == ["rtsp://u:from-systemd@h/", "rtsp://u:from-docker@h/",
                    "rtsp://u:from-file@h/", "file:///clips/${literal}.mp4"]


def test_redact_masks_userinfo_query_secrets_and_substituted_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redact("rtsp://admin:pw@10.0.0.5:554/x") == "rtsp://***@10.0.0.5:554/x"
    assert redact("open rtsps://token@cam/x failed") == "open rtsps://***@cam/x failed"
    assert redact("http://h/x?user=a&password=b&x=1") == "http://h/x?user=***&password=***&x=1"
    assert redact("rtsp://10.0.0.5/x") == "rtsp://10.0.0.5/x"
    assert redact("rtsp://admin:p@ss@cam:554/x") == "rtsp://***@cam:554/x"  # '@' not encoded
    monkeypatch.setenv("WEIRD_SECRET", "tr0ub4dor&3")
    path = write(tmp_path, """
        engine: {path: "${WEIRD_SECRET}"}
        streams: []
    """)
    load_config(path)
    assert redact("engine tr0ub4dor&3 not found") == "engine *** not found"


def test_errors_reprs_and_tracebacks_never_show_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAM_PASS", "n0t-in-logs")
    path = write(tmp_path, """
        engine: {path: e}
        publish: {endpoint: "http://x:${CAM_PASS}@h"}
        streams:
          - {name: cam1, url: "rtsp://admin:${CAM_PASS}@10.0.0.5/s", transport: quic}
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "n0t-in-logs" not in str(info.value) and len(info.value.problems) == 2

    stream = StreamConfig(name="cam1", url="rtsp://admin:n0t-in-logs@10.0.0.5/s")
    assert "n0t-in-logs" not in repr(stream) and "n0t-in-logs" not in stream.safe_url
    formatter = RedactingFormatter(logging.Formatter("%(message)s"))
    try:
        raise ConnectionError(f"cannot open {stream.url}")
    except ConnectionError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed: %s", (stream.url,),
                                   exc_info=sys.exc_info())
    line = formatter.format(record)
    assert "Traceback" in line and "n0t-in-logs" not in line


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
        engine: {path: engines/tiny}
        pid_file: run/daemon.pid
    """)
    config = load_config(path)
    assert config.engine.path == tmp_path / "engines/tiny"
    assert config.pid_file == tmp_path / "run/daemon.pid"


def test_class_allow_list_resolves_names_and_ids() -> None:
    assert resolve_class_ids(("person", 2, "truck"), COCO_CLASSES) == frozenset({0, 2, 7})
    with pytest.raises(ValueError, match=r"'persn' \(did you mean 'person'\?\), 80"):
        resolve_class_ids(("persn", 80), COCO_CLASSES)


def test_custom_class_names_are_checked_when_given(tmp_path: Path) -> None:
    path = write(tmp_path, """
        engine: {path: e}
        streams: [{name: c, url: "rtsp://h/", classes: [forklift]}]
    """)
    with pytest.raises(ConfigError, match="unknown classes 'forklift'"):
        load_config(path)
    assert load_config(path, class_names=("pallet", "forklift")).streams[0].classes == ("forklift",)
    assert load_config(path, class_names=None).streams[0].classes == ("forklift",)


def test_roi_points_are_fractions_and_must_enclose_an_area(tmp_path: Path) -> None:
    path = write(tmp_path, """
        engine: {path: e}
        streams:
          - name: c1
            url: rtsp://h/
            roi: {points: [[0, 0], [1.5, 0], [1, 1]]}
          - name: c2
            url: rtsp://h/
            roi: {points: [[0, 0], [0.5, 0.5], [1, 1]]}
    """)
    assert [(line, field) for line, field, _ in problems(path)] == [
        (5, "streams[0].roi.points[1][0]"), (8, "streams[1].roi.points")]


def _config(tmp_path: Path, streams: str, extra: str = "") -> DaemonConfig:
    return load_config(write(tmp_path, f"engine: {{path: e}}\n{extra}streams:\n{streams}",
                             f"c{len(list(tmp_path.iterdir()))}.yaml"))


def test_diff_reports_stream_changes_and_settings_that_need_a_restart(tmp_path: Path) -> None:
    old = _config(tmp_path, textwrap.dedent("""\
        - {name: a, url: "rtsp://h/a"}
        - {name: b, url: "rtsp://h/b"}
        - {name: c, url: "rtsp://h/c", min_score: 0.3}
        - {name: d, url: "rtsp://h/d"}
        - {name: e, url: "rtsp://h/e", enabled: false}
    """))
    new = _config(tmp_path, textwrap.dedent("""\
        - {name: a, url: "rtsp://h/a"}
        - {name: c, url: "rtsp://h/c", min_score: 0.5}
        - {name: d, url: "rtsp://h/d2"}
        - {name: e, url: "rtsp://h/e"}
        - {name: f, url: "rtsp://h/f"}
    """), extra="batching: {max_batch: 4}\n")
    change = diff(old, new)
    assert [s.name for s in change.added] == ["e", "f"]  # e was disabled: enabling adds it
    assert [s.name for s in change.removed] == ["b"]
    assert [s.name for s in change.changed] == ["c", "d"]
    assert change.changed[0].min_score == 0.5
    assert change.reconnect == ("d",)
    assert change.restart_required == ("batching",)
    assert diff(new, new).empty


# ---- network limits and credential files (publish, health) ----


def test_credential_files_are_checked_when_loading_and_never_printed(tmp_path: Path) -> None:
    secret = "not-a-curve-key-but-secret-text"
    (tmp_path / "bad.key").write_text(secret + "\n")
    (tmp_path / "short.token").write_text("abc\n")
    path = write(tmp_path, """
        engine: {path: /tmp/engine}
        publish: {curve_secret_key_file: bad.key, max_subscribers: 0}
        health: {token_file: short.token, request_timeout_s: .inf, max_connections: -1}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = {p.field: p for p in info.value.problems}
    assert set(found) == {"publish.curve_secret_key_file", "publish.max_subscribers",
                          "health.token_file", "health.request_timeout_s",
                          "health.max_connections"}
    assert "not a CURVE key" in found["publish.curve_secret_key_file"].message
    assert "at least 16" in found["health.token_file"].message
    assert all(p.line and "\n" not in str(p) for p in found.values())
    assert secret not in str(info.value)


def test_credential_files_resolve_next_to_the_config(tmp_path: Path) -> None:
    zmq = pytest.importorskip("zmq")
    _public, secret = zmq.curve_keypair()
    (tmp_path / "server.secret").write_bytes(secret + b"\n")
    (tmp_path / "token").write_text("t" * 32 + "\n")
    config = load_config(write(tmp_path, """
        engine: {path: /tmp/engine}
        publish: {curve_secret_key_file: server.secret, max_subscribers: 8}
        health: {token_file: token, max_connections: 4, request_timeout_s: 2.5}
        """))
    assert config.publish.curve_secret_key_file == tmp_path / "server.secret"
    assert config.health.token_file == tmp_path / "token"
    assert (config.publish.max_subscribers, config.health.max_connections) == (8, 4)
