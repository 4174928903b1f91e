"""What both pages share: the API client, the cached domain list and cards, the domain switcher."""

from __future__ import annotations

import os
from typing import Any

import streamlit as st

from thali.ui.client import ApiProblem, Client, api_url


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
