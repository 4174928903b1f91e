"""What the pages share: the API client, the cached domain list and cards, the domain switcher, photos
in a format every browser shows."""

from __future__ import annotations

import io
import os
from typing import Any

import streamlit as st

from thali.core.errors import DataError
from thali.core.images import decode_rgb
from thali.ui.client import ApiProblem, Client, api_url

BROWSER_FORMATS = (b"\xff\xd8", b"\x89PNG", b"GIF8")  # JPEG, PNG, GIF: every browser shows these as sent


def client() -> Client:
    return Client(st.session_state.get("api_url") or api_url())


@st.cache_data(ttl=10, show_spinner=False)
def load_domains(base: str) -> dict[str, Any]:
    return Client(base).domains()


@st.cache_data(ttl=30, show_spinner=False)
def load_card(base: str, domain: str, version: int) -> dict[str, Any]:
    return Client(base).card(domain)


def headline(domain: dict[str, Any]) -> str:
    top1 = (domain.get("metrics") or {}).get("top1")
    score = f"top-1 {100 * top1:.1f} % on validation" if isinstance(top1, int | float) else "no metrics"
    where = f"v{domain['version']} ({domain['ref']}) · {domain['variant']}"
    return f"{where} · {score} · licence: {domain['licence']}"


def domain_switcher() -> dict[str, Any] | None:
    """The sidebar: API address and the domain picker. None (and a message) when nothing can be served."""
    base = client().base
    with st.sidebar:
        st.markdown("### thali")
        st.caption(f"API: {base}")
        try:
            listing = load_domains(base)
        except ApiProblem as problem:
            st.error(problem.message)
            if st.button("Try again"):
                load_domains.clear()
                st.rerun()
            return None
        domains = {d["domain"]: d for d in listing.get("domains", [])}
        for name, why in (listing.get("not_loaded") or {}).items():
            st.warning(f"Domain {name!r} is not being served: {why}")
        if not domains:
            st.error("The API serves no domain yet: publish a model and load it.")
            return None
        names = sorted(domains)
        # this session's choice, else a link's ?domain=, else `thali ui --domain` / $THALI_UI_DOMAIN
        current = (
            st.session_state.get("domain")
            or st.query_params.get("domain")
            or os.environ.get("THALI_UI_DOMAIN")
        )
        index = names.index(current) if current in names else 0
        chosen = st.selectbox(
            "Domain",
            names,
            index=index,
            format_func=lambda n: str(domains[n].get("display_name") or n),
            key="domain_select",
        )
        st.session_state["domain"] = chosen
        st.caption(headline(domains[chosen]))
    return domains[chosen]


@st.cache_data(max_entries=256, show_spinner=False)
def preview(data: bytes, box: int = 960) -> bytes:
    """What the browser is shown: the photo as sent, or, for HEIC, TIFF, AVIF ... that browsers may not
    show, a PNG of it downscaled to fit ``box`` (decoded within the server's image limits)."""
    if data.startswith(BROWSER_FORMATS):
        return data
    try:
        rgb = decode_rgb(data, keep_shorter=min(640, box))
    except DataError:
        return data  # the server's answer says what is wrong with it
    from PIL import Image

    image = Image.fromarray(rgb)
    image.thumbnail((box, box))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
