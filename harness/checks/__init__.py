"""Running the checks of one case on one backend, in this process: the plan (which checks run
and why not the others), the check context (inputs, reference and baseline computed once), the
checks registered by name, the forward contract and the timing protocol."""
