"""crs_core: the library behind the CRS curation studio (no Streamlit in here)."""

__version__ = "0.1.0"
