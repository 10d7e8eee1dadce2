"""Map: the 2-D projection of review embeddings coloured by K-means cluster, with a selection
overlaid in pick order; box / lasso a region to read its reviews."""

import plotly.graph_objects as go
import streamlit as st

from crs_core import views
from crs_core.views import cluster_palette
from pages._shared import cached, ensure_navigation, needs, workspace

ensure_navigation()

st.title("Embeddings & clusters")
ws = workspace()
sets = cached(views.embedding_sets)
if sets.empty:
    needs("No embeddings yet. Build the default workspace on Home (it embeds, clusters and maps the "
          "reviews), or run `python -m crs_core embed` then `python -m crs_core cluster`.",
          "pages/home.py", "Home")
    st.stop()
mapped = sets[sets["n_projected"] > 0]
if mapped.empty:
    st.dataframe(sets, hide_index=True, width="stretch")
    needs("These embedding sets have no 2-D map yet. Run `python -m crs_core cluster --set <set id>` "
          "(K-means and the UMAP projection).")
    st.stop()

c1, c2, c3 = st.columns(3)
set_id = c1.selectbox("Embedding set", mapped["set_id"].tolist(), key="map_set")
clus = cached(views.clusterings, set_id)
clustering = c2.selectbox("Colour by clustering", [None] + clus["clustering_id"].tolist(), key="map_clustering",
                          index=1 if len(clus) else 0, format_func=lambda c: "(no colours)" if c is None else c)
sels = cached(views.selections)
sels = sels[sels["set_id"] == set_id]
labels = {r.selection_id: f"{r.name or r.selection_id} — {r.strategy}, B={r.budget}" for r in sels.itertuples()}
overlay = c3.selectbox("Overlay a selection", [None] + list(labels), key="map_overlay", index=1 if labels else 0,
                       format_func=lambda s: "(none)" if s is None else labels[s],
                       help="Its picks are drawn as diamonds, numbered and coloured by pick order.")

# big maps get shorter hover snippets: every point's hover text travels to the browser
n_mapped = int(mapped.set_index("set_id").loc[set_id, "n_projected"])
points = cached(views.map_points, set_id, clustering, 160 if n_mapped <= 20_000 else 80, views.MAP_MAX_POINTS)
drawn = (f"{len(points):,} points" if len(points) >= n_mapped else
         f"A fixed sample of {len(points):,} of the {n_mapped:,} points (maps past {views.MAP_MAX_POINTS:,} points "
         "draw a sample; the selection overlay and the cluster table count every point)")
st.caption(f"{drawn}. Hover for the review and its film; drag a box or lasso to inspect a region.")

# a seeded sample of 3,000 texts: all 16.7k default reviews take ~15 s (the cold page's largest
# cost) for words that a sample of ~150 texts per cluster finds as well
terms = cached(views.cluster_top_terms, clustering, 8, 3000) if clustering else None
cluster_lines = views.cluster_hover_lines(terms)

fig = go.Figure()
groups = [(None, points)] if clustering is None else list(points.groupby("cluster", dropna=False, sort=True))
palette = cluster_palette(len(groups))
for (cluster, frame), colour in zip(groups, palette):
    # numpy arrays, not lists: Plotly validates a list element by element (seconds at 50k points);
    # the cluster's top terms are one string per trace (its hovertemplate), not one per point
    line = cluster_lines.get(cluster)
    fig.add_trace(go.Scattergl(
        x=frame["x"].to_numpy(), y=frame["y"].to_numpy(), mode="markers",
        customdata=frame["unit_id"].to_numpy(dtype=object),
        name="reviews" if cluster is None else f"cluster {cluster}",
        marker={"size": 4 if len(points) > 5000 else 6, "opacity": 0.6, "color": colour},
        hovertext=frame["hover"].to_numpy(dtype=object), hoverinfo="text",
        hovertemplate=None if line is None else "%{hovertext}<br>" + line + "<extra></extra>",
    ))
picks = cached(views.selection_picks, overlay, clustering).dropna(subset=["x"]) if overlay else None
if picks is not None and picks.empty:
    st.caption("None of this selection's picks is on this map.")
if picks is not None and not picks.empty:
    show_numbers = len(picks) <= 60
    fig.add_trace(go.Scattergl(
        x=picks["x"], y=picks["y"], customdata=picks["unit_id"], name="selection (pick order)",
        mode="markers+text" if show_numbers else "markers",
        text=picks["rank"].astype(str) if show_numbers else None, textposition="top center",
        marker={"size": 11, "symbol": "diamond", "color": picks["rank"], "colorscale": "Viridis",
                "line": {"width": 1, "color": "black"},
                "colorbar": {"title": {"text": "pick #"}, "thickness": 12, "len": 0.6}},
        hovertext=[f"pick {r}<br>{h}" for r, h in
                   zip(picks["rank"], views.hover_texts(picks["title"], picks["year"], picks["text"].str[:160]))],
        hoverinfo="text",
    ))
fig.update_layout(height=620, margin={"l": 10, "r": 10, "t": 30, "b": 10}, dragmode="lasso",
                  legend={"itemsizing": "constant", "orientation": "h", "y": -0.02, "yanchor": "top"},
                  xaxis={"showticklabels": False}, yaxis={"showticklabels": False})
event = st.plotly_chart(fig, key="map_chart", on_select="rerun", selection_mode=("box", "lasso"),
                        config={"displaylogo": False})

chosen = []
if event is not None and event.selection and event.selection.points:
    chosen = sorted({p.get("customdata") for p in event.selection.points if p.get("customdata") is not None})
if chosen:
    st.subheader(f"Selected region: {len(chosen):,} points")
    unit = sets.set_index("set_id").loc[set_id, "unit"]
    if unit == "review":
        region = cached(views.reviews_table, "", (), None, clustering, (), None, tuple(chosen), 2000)
        if clustering:
            st.bar_chart(region["cluster"].value_counts().sort_index(), x_label="cluster", y_label="reviews",
                         height=200)
        st.caption("Select a row to read the review in full.")
        region_event = st.dataframe(region, hide_index=True, width="stretch", key="map_region_table",
                                    on_select="rerun", selection_mode="single-row",
                                    column_config={"text": st.column_config.TextColumn(width="large")})
        rows = region_event.selection.rows if region_event is not None else []
        if rows:
            row = region.iloc[rows[0]]
            with st.container(border=True):
                st.text(f"{row['title']} ({row['year']}) — review {row['review_id']}")
                st.text(cached(views.review_text, row["review_id"]) or row["text"])
    else:
        st.dataframe(points[points["unit_id"].isin(chosen)], hide_index=True, width="stretch")

if clustering:
    st.subheader("Clusters")
    sizes = cached(views.cluster_sizes, clustering)
    left, right = st.columns([0.35, 0.65])
    left.bar_chart(sizes, x="cluster", y="n", x_label="cluster", y_label="reviews")
    with right:  # a static table: as tall as its rows, the top terms wrapped instead of cut off
        st.table(views.cluster_table(sizes, terms))
