"""What a run leaves behind and what is read from it: records and their schema, the report, the
comparison with a baseline, plots and the jury of backends."""
