"""The math of each PaRa parametrization as plain functions on tensors, one module per form
(the same verbs in each): projection.py (W0 - s U (V^T W0): a subject, U = V = QR(B), and merged files),
reference.py (W0 - s U D, the reference code's parametrization), base.py (what both share)."""
