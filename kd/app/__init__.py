"""The application layer: the `kd` command, the jobs behind its verbs, the demo and the sweep runner.

It sits on top of everything: kd core, teachers, students and benchmarks.
"""
