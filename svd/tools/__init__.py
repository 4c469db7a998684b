"""Operator commands on top of the wings: benchmarks (`svd bench`, `svd swapbench`, and
`python -m svd.tools.trtbench`, `.idlebench`, `.mappingbench`, `.overload`), `svd publish` and
`svd register` (the model card and the NATIX registration, signed with the daemon's hotkey),
and `svd doctor` (doctor.py the command, doctor_checks.py the checks, doctor_verdict.py the line
both share)."""
