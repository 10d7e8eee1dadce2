"""Seeds: browse and filter items and reviews; add your own file (validated first)."""

import tempfile
from pathlib import Path

import streamlit as st

from crs_core import datasets, views
from crs_core.errors import CRSError
from crs_core.ingest import ingest_file
from pages._shared import authorized, cached, ensure_navigation, needs, show_error, workspace

ensure_navigation()

st.title("Seed data")
ws = workspace()
counts = views.counts(ws)
c = st.columns(4)
c[0].metric("Items", f"{counts['items']:,}")
c[1].metric("Reviews", f"{counts['reviews']:,}")
c[2].metric("Interactions", f"{counts['interactions']:,}")
c[3].metric("Dialogue turns", f"{counts['dialogue_turns']:,}")

REVIEW_SNIPPET = 300
PAGE_SIZE = 500  # rows a table page reads from the workspace (LIMIT / OFFSET), whatever the matches


def items_tab() -> None:
    if counts["items"] == 0:
        needs("No items yet. Build the default workspace on Home, or add an items file in the "
              "'Add your own file' tab.", "pages/home.py", "Home")
    else:
        f1, f2, f3, f4 = st.columns([0.4, 0.35, 0.13, 0.12], vertical_alignment="bottom")
        search = f1.text_input("Search title, id or plot", key="seeds_item_search")
        genre = f2.multiselect("Genres (all of)", cached(views.genres), key="seeds_item_genres")
        reviewed = f3.checkbox("Only reviewed", key="seeds_item_reviewed")
        page_no = f4.number_input("Page", min_value=1, step=1, key="seeds_item_page")
        page = cached(views.items_page, search, tuple(genre), reviewed, int(page_no) - 1, PAGE_SIZE)
        items = page.rows
        st.caption(f"{page.caption('items')}, most reviewed first. Select a row to see the whole item.")
        event = st.dataframe(items, hide_index=True, width="stretch", key="seeds_items_table",
                             on_select="rerun", selection_mode="single-row",
                             column_config={"avg_rating": st.column_config.NumberColumn(format="%.1f"),
                                            "year": st.column_config.NumberColumn(format="%d"),
                                            "title": st.column_config.TextColumn(width="medium"),
                                            "genres": st.column_config.TextColumn(width="medium"),
                                            "directors": st.column_config.TextColumn(width="medium")})
        rows = event.selection.rows if event is not None else []
        if rows:
            detail = cached(views.item_detail, str(items.iloc[rows[0]]["item_id"])) or {}
            with st.container(border=True):  # long fields in full, as text
                for field, value in detail.items():
                    st.text(f"{field}: {value}")


def reviews_tab() -> None:
    if counts["reviews"] == 0:
        needs("No reviews yet. Build the default workspace on Home, or add a reviews file in the "
              "'Add your own file' tab.", "pages/home.py", "Home")
    else:
        f1, f2 = st.columns(2)
        search = f1.text_input("Search review text or title", key="seeds_review_search")
        genre = f2.multiselect("Genres (all of)", cached(views.genres), key="seeds_review_genres")
        lo, hi = cached(views.rating_range)
        f3, f4, f5, f6 = st.columns([0.35, 0.3, 0.23, 0.12])
        rating = f3.slider("Rating", lo, hi, (lo, hi), key="seeds_review_rating") if hi > lo else None
        clusterings = cached(views.clusterings)
        options = [None] + clusterings["clustering_id"].tolist()
        clustering = f4.selectbox("Clustering", options, key="seeds_review_clustering",
                                  format_func=lambda c: "(none)" if c is None else c,
                                  help="Filter by K-means cluster (see the Map page).")
        clusters = []
        if clustering:
            sizes = cached(views.cluster_sizes, clustering)
            clusters = f5.multiselect("Clusters", sizes["cluster"].tolist(), key="seeds_review_clusters")
        page_no = f6.number_input("Page", min_value=1, step=1, key="seeds_review_page")
        page = cached(views.reviews_page, search, tuple(genre), tuple(rating) if rating else None,
                      clustering, tuple(clusters), int(page_no) - 1, PAGE_SIZE, REVIEW_SNIPPET)
        reviews = page.rows
        st.caption(f"{page.caption('reviews')}, texts cut at {REVIEW_SNIPPET} characters. "
                   "Select a row to read it in full.")
        event = st.dataframe(reviews, hide_index=True, width="stretch", key="seeds_reviews_table",
                             on_select="rerun", selection_mode="single-row",
                             column_config={"text": st.column_config.TextColumn(width="large")})
        rows = event.selection.rows if event is not None else []
        if rows:
            row = reviews.iloc[rows[0]]
            with st.container(border=True):
                st.text(f"{row['title']} ({row['year']}) — rating {row['rating']} — review {row['review_id']}")
                st.text(cached(views.review_text, row["review_id"]) or row["text"])


def add_file_tab() -> None:
    st.write("Add reviews, items, interactions, tags or dialogues in a supported format. The whole "
             "file is checked first; nothing is written when it has a problem (unless you choose "
             "to skip bad rows, which are then listed).")
    with st.expander("Supported formats"):
        st.dataframe({"format": list(datasets.FORMATS),
                      "holds": [f.kind for f in datasets.FORMATS.values()],
                      "description": [f.description for f in datasets.FORMATS.values()]},
                     hide_index=True, width="stretch")
    upload = st.file_uploader("File (JSONL, JSON, CSV, TSV; .gz allowed)", key="seeds_upload",
                              type=["jsonl", "json", "csv", "tsv", "gz", "txt"])
    a1, a2, a3 = st.columns(3)
    kind = a1.selectbox("It holds", ["(detect)", "reviews", "items", "interactions", "tags", "dialogues"],
                        key="seeds_upload_kind")
    skip_bad = a2.checkbox("Skip bad rows and unknown items (and list them)", key="seeds_upload_skip")
    dataset = a3.text_input("Dataset name (dialogues)", key="seeds_upload_dataset")
    kind_arg = None if kind == "(detect)" else kind
    b1, b2 = st.columns(2)
    check = b1.button("Check file", key="seeds_check", disabled=upload is None, icon=":material/rule:")
    add = b2.button("Add to workspace", key="seeds_add", type="primary", disabled=upload is None,
                    icon=":material/upload:")
    if upload is not None and (check or (add and authorized("ingest"))):
        suffix = "".join(Path(upload.name).suffixes[-2:]) or ".jsonl"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / (Path(upload.name).name or f"upload{suffix}")
            path.write_bytes(upload.getvalue())
            try:
                with st.spinner("Checking the file…"):
                    loaded = datasets.load(path, kind=kind_arg, skip_bad=skip_bad)
                rep = loaded.report
                st.success(f"Valid {rep.kind} file ({rep.fmt}): {rep.kept:,} rows kept, {rep.skipped:,} skipped.")
                if rep.problems:
                    st.warning("Skipped rows and why:")
                    st.dataframe({"line": [ln for ln, _ in rep.problems], "reason": [why for _, why in rep.problems]},
                                 hide_index=True, width="stretch")
                for note in rep.notes:
                    st.text(note)
                if add:
                    with st.spinner("Adding to the workspace…"):
                        result = ingest_file(ws, path, kind_arg, skip_bad=skip_bad, dataset=dataset.strip() or None)
                    st.success("Added to the workspace.")
                    st.code("\n".join(result.lines()), language=None)
                    for what, examples in result.skipped.items():
                        st.warning(f"Skipped {what} of items not in the catalog, e.g. {', '.join(map(str, examples))}")
            except (CRSError, ValueError, OSError) as exc:
                show_error(exc)
                st.caption("Nothing was written to the workspace.")


# only the open tab runs (on_change="rerun"): every visit used to build and send the hidden tabs'
# tables too; the open tab is kept in the URL (?seeds_tab=Reviews) so a link can open it directly
tab_items, tab_reviews, tab_add = st.tabs(["Items", "Reviews", "Add your own file"], key="seeds_tab",
                                          on_change="rerun", bind="query-params")
for tab, body in ((tab_items, items_tab), (tab_reviews, reviews_tab), (tab_add, add_file_tab)):
    if tab.open:
        with tab:
            body()
