"""Views of a scored output: what a mask removes, for a person.

=================  ==========================================================================
``flat``           an output read into flat arrays; rules applied to it (one per reader)
``text``           data text made safe to show (control characters as escapes), token texts
``stats``          counts, threshold sweep, histograms, top tokens (``profit-prep stats``)
``colors``         quantile colour scales of any stored per-token column
``terminal``       the terminal view (``profit-prep inspect``)
``report``         the self-contained HTML report (``profit-prep report``)
``plots``          the report's plots, inline SVG
=================  ==========================================================================
"""
