"""Domain packs shipped with thali: one folder each, holding domain.yaml and a README card."""
