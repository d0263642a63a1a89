"""Statistics of data-aware merge methods (RegMean, RegMean++, Fisher) gathered layer by layer from calibration
texts, cached by content hash; `prepare.statistics_for(plan)` is the one entry point."""
