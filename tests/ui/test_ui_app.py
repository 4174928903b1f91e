"""The Streamlit app driven with streamlit's AppTest against a real ``thali serve`` on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from api_support import Server, jpeg, start_server, stop_server

APP = str(Path(__file__).resolve().parents[2] / "ui" / "app.py")


def _app(url: str, domain: str | None = "tiny") -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["api_url"] = url
    at.run()
    if domain and not at.exception and at.sidebar.selectbox:
        at.sidebar.selectbox(key="domain_select").set_value(domain).run()
    return at


def _texts(at: Any) -> str:
    parts = [
        e.value
        for kind in ("success", "warning", "error", "info", "caption", "markdown")
        for e in getattr(at, kind)
    ]
    parts += [e.value for e in at.sidebar.caption] + [e.value for e in at.sidebar.error]
    return "\n".join(str(p) for p in parts)


def _grey_photo() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_domains_are_listed_and_switching_keeps_the_uploads(server: Server) -> None:
    at = _app(server.url)
    assert not at.exception
    picker = at.sidebar.selectbox(key="domain_select")
    assert set(picker.options) >= {"Tiny", "Duo"}  # display names
    assert "top-1 100.0 % on validation" in _texts(at) and "licence" in _texts(at)
    assert any("broken" in w.value for w in at.sidebar.warning)  # a damaged package is named
    at.file_uploader[0].set_value(("red.jpg", jpeg("red", seed=3), "image/jpeg")).run()
    assert "**Red**" in _texts(at)
    picker = at.sidebar.selectbox(key="domain_select")
    picker.set_value("duo").run()
    assert not at.exception
    assert at.sidebar.selectbox(key="domain_select").value == "duo"
    assert "· fp32 ·" in _texts(at) and "**Red**" in _texts(at)  # duo serves fp32; the photo asked again
    assert len(at.session_state["uploads"]) == 1


def test_a_real_photo_gets_the_api_answer_and_a_bar_chart(server: Server, datasets_root: Path) -> None:
    photo = sorted((datasets_root / "south_asian_food" / "dosa").glob("*.jp*g"))[0].read_bytes()
    expected = server.post("/v1/domains/tiny/predict", files={"image": photo}).json()
    at = _app(server.url)
    at.file_uploader[0].set_value(("dosa.jpg", photo, "image/jpeg")).run()
    assert not at.exception
    top = expected["predictions"][0]["display_name"]
    assert f"**{top}**" in _texts(at)
    charts = at.get("vega_lite_chart")
    assert charts, "a bar chart of the top labels"
    assert any("ms on the server" in c.value for c in at.caption)
    unknown = "Probably not one of the 3 things this domain knows"  # the package's feature scores said so
    outcome = unknown if expected["unknown"] else f"**{top}** ·"
    assert outcome in _texts(at)


def test_the_unknown_outcome_is_shown(server: Server) -> None:
    grey = _grey_photo()
    assert server.post("/v1/domains/tiny/predict", files={"image": grey}).json()["unknown"]
    at = _app(server.url)
    at.file_uploader[0].set_value(("grey.jpg", grey, "image/jpeg")).run()
    assert any("Probably not one of the 3 things this domain knows" in w.value for w in at.warning)


def test_a_heic_photo_is_answered_and_previewed_in_a_browser_format(server: Server) -> None:
    """iPhones' HEIC: the server answers it; the page shows it as PNG or JPEG (browsers may not show it)."""
    from PIL import Image

    from thali.core.images import accepted_formats

    assert "HEIF" in accepted_formats()
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg("red", (96, 72), seed=5))).save(buffer, "HEIF", quality=90)
    at = _app(server.url)
    at.file_uploader[0].set_value(("red.heic", buffer.getvalue(), "image/heic")).run()
    assert not at.exception
    assert any("red" in s.value.lower() for s in at.success), _texts(at)
    shown = [img.proto.imgs[0] for img in at.get("image") if img.proto.imgs]
    assert shown and shown[0].caption == "red.heic" and shown[0].url.endswith((".png", ".jpg")), shown


def test_the_explain_toggle_overlays_the_heatmap(server: Server) -> None:
    at = _app(server.url)
    at.file_uploader[0].set_value(("red.jpg", jpeg("red", seed=5), "image/jpeg")).run()
    at.toggle(key="explain").set_value(True).run()
    assert not at.exception
    captions = [img.proto.imgs[0].caption for img in at.get("image") if img.proto.imgs]
    assert any("where the model looked" in c for c in captions), captions


def test_messages_instead_of_stack_traces(server: Server) -> None:
    down = _app("http://127.0.0.1:9", domain=None)
    assert not down.exception
    assert "not reachable at http://127.0.0.1:9" in _texts(down)
    at = _app(server.url)
    # the uploader takes only the accepted suffixes (a .txt never reaches the page); bytes that are no
    # image under an image's name reach the server, whose 415 becomes a message
    assert ".heic" in at.file_uploader[0].proto.type and ".txt" not in at.file_uploader[0].proto.type
    at.file_uploader[0].set_value(("notes.jpg", b"not a picture", "image/jpeg")).run()
    assert not at.exception and "not a picture the model can read" in _texts(at)


def test_the_model_card_page(server: Server) -> None:
    at = _app(server.url)
    at.switch_page("pages/model_card.py").run()
    assert not at.exception
    text = _texts(at)
    assert "Licence:" in text and at.metric and at.dataframe
    variants = at.dataframe[0].value
    assert set(variants["variant"]) == {"fp32", "int8"}
    assert len(at.get("vega_lite_chart")) >= 2  # per-class accuracy and the confusion matrix


def test_the_ui_imports_no_torch_or_engine() -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import thali.ui.client, thali.ui.shared\n"
        "heavy = ('torch', 'onnxruntime', 'thali.core.training', 'albumentations')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- feedback: "Not right?" under every answer, the Feedback page -------------------------------------

FEEDBACK_KEY = "ui-feedback-key-0123456789"


@pytest.fixture(scope="module")
def feedback_server(api_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same registry served with feedback on (a store in a temporary folder) and a feedback key."""
    root = tmp_path_factory.mktemp("feedback_server")
    env = {
        "THALI_FEEDBACK": str(root / "store"),
        "THALI_FEEDBACK_KEY": FEEDBACK_KEY,
        "THALI_CACHE": str(root / "cache"),
    }
    running = start_server(api_registry, root / "serve.log", env)
    try:
        yield running
    finally:
        stop_server(running)


def _stored(server: Server, domain: str = "tiny") -> dict[str, Any]:
    answer = server.get(f"/v1/domains/{domain}/feedback", headers={"X-Feedback-Key": FEEDBACK_KEY})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _correct(at: Any, sha256: str, label: str, domain: str = "tiny") -> None:
    """Pick ``label`` under "Not right?" of the photo ``sha256`` and press "Send correction"."""
    at.selectbox(key=f"fb_label_{domain}_{sha256}").set_value(label).run()
    at.button(key=f"fb_send_{domain}_{sha256}").click().run()


def test_a_correction_sent_from_the_classify_page_is_stored_once_and_listed(
    feedback_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THALI_FEEDBACK_KEY", FEEDBACK_KEY)  # the UI runs in this process
    assert feedback_server.get("/v1/domains/tiny").json()["feedback"] is True
    red, blue = jpeg("red", seed=21), jpeg("blue", seed=22)
    red_sha, blue_sha = hashlib.sha256(red).hexdigest(), hashlib.sha256(blue).hexdigest()
    at = _app(feedback_server.url)
    at.file_uploader[0].set_value([("red.jpg", red, "image/jpeg"), ("blue.jpg", blue, "image/jpeg")]).run()
    assert not at.exception
    assert [e.label for e in at.expander].count("Not right?") == 2  # one under each answer
    picker = at.selectbox(key=f"fb_label_tiny_{red_sha}")
    assert picker.options == ["Blue", "Green", "Red", "None of these"]  # display names
    assert picker.value is None and at.button(key=f"fb_send_tiny_{red_sha}").disabled

    _correct(at, red_sha, "green")  # the model said red: a correction
    assert not at.exception
    assert any("Thanks — saved as **Green**" in s.value and "had said Red" in s.value for s in at.success)
    _correct(at, blue_sha, "blue")  # the model said blue: confirmed
    assert any("Thanks — saved as **Blue**" in s.value and "said so too" in s.value for s in at.success)
    at.run()  # a rerun shows what was saved and sends nothing again
    at.run()
    mine = [r for r in _stored(feedback_server)["records"] if r["image_sha256"] in {red_sha, blue_sha}]
    assert len(mine) == 2, mine
    by_sha = {r["image_sha256"]: r for r in mine}
    assert by_sha[red_sha]["label"] == "green" and by_sha[red_sha]["answer_label"] == "red"
    assert not by_sha[red_sha]["agreed"] and by_sha[blue_sha]["agreed"]
    assert [e.label for e in at.expander].count("Not right?") == 0  # both answered

    at.switch_page("pages/feedback.py").run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("class")
    listing = _stored(feedback_server)
    for label, shown in (("green", "Green"), ("blue", "Blue")):
        assert table.loc[shown, "corrected"] == listing["counts"][label]["corrected"]
        assert table.loc[shown, "agreed"] == listing["counts"][label]["agreed"]
    assert table.loc["Green", "corrected"] >= 1 and table.loc["Blue", "agreed"] >= 1
    captions = [img.proto.imgs[0].caption for img in at.get("image") if img.proto.imgs]
    assert len(captions) == min(listing["total"], 200), captions  # the newest 200 photos
    assert any("✗ model said Red" in c for c in captions) and any("✓ model said Blue" in c for c in captions)


def test_none_of_these_and_the_api_message_when_the_key_is_missing(
    feedback_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    grey = _grey_photo()
    sha = hashlib.sha256(grey).hexdigest()
    monkeypatch.delenv("THALI_FEEDBACK_KEY", raising=False)
    at = _app(feedback_server.url)
    at.file_uploader[0].set_value(("grey.jpg", grey, "image/jpeg")).run()
    _correct(at, sha, "none_of_these")
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("Not saved:") and "THALI_FEEDBACK_KEY" in e for e in errors), errors
    assert all(r["image_sha256"] != sha for r in _stored(feedback_server)["records"])
    monkeypatch.setenv("THALI_FEEDBACK_KEY", FEEDBACK_KEY)
    at.button(key=f"fb_send_tiny_{sha}").click().run()  # the choice is kept: one more click sends it
    saved = [s.value for s in at.success if "Thanks — saved as **None of these**" in s.value]
    assert saved, _texts(at)
    record = next(r for r in _stored(feedback_server)["records"] if r["image_sha256"] == sha)
    assert record["label"] == "none_of_these" and record["answer_label"] in {"blue", "green", "red"}
    assert record["agreed"] == ("said so too" in saved[0])  # the model flagged it as not one of its classes
    photo = requests.get(
        f"{feedback_server.url}/v1/domains/tiny/feedback/photos/{sha}",
        headers={"X-Feedback-Key": FEEDBACK_KEY},
        timeout=30,
    )
    assert photo.status_code == 200 and photo.content == grey


def test_the_feedback_page_says_when_there_is_nothing_yet_or_the_key_is_missing(
    feedback_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THALI_FEEDBACK_KEY", raising=False)
    at = _app(feedback_server.url, domain="duo")
    at.switch_page("pages/feedback.py").run()
    assert not at.exception
    assert any("could not be read" in e.value and "THALI_FEEDBACK_KEY" in e.value for e in at.error)
    monkeypatch.setenv("THALI_FEEDBACK_KEY", FEEDBACK_KEY)
    at.run()  # nobody corrected duo
    assert not at.exception
    assert any("No corrections for **Duo** yet" in i.value for i in at.info), _texts(at)


def test_no_feedback_control_when_the_server_keeps_none(server: Server) -> None:
    assert not server.get("/v1/domains/tiny").json().get("feedback")
    at = _app(server.url)
    at.file_uploader[0].set_value(("red.jpg", jpeg("red", seed=23), "image/jpeg")).run()
    assert not at.exception and "**Red**" in _texts(at)
    assert not [e for e in at.expander if e.label == "Not right?"]
    assert not [b for b in at.button if b.label == "Send correction"]
    at.switch_page("pages/feedback.py").run()
    assert not at.exception
    assert any("Feedback is off for **Tiny**" in i.value for i in at.info), _texts(at)
