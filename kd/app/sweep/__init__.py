"""`kd sweep FILE.yaml [--jobs N]`: runs x seeds from one YAML file, resumable, summarised as CSV + markdown.

The file holds ``runs_dir`` (where run directories go), ``results`` (path prefix of the tidy
CSV and the markdown table), ``seeds``, ``base`` (config keys shared by every run) and
``runs``: a list of entries with a ``name``, a ``verb`` (``train-teacher``, ``distill``,
``proxy-export`` or ``teacher-cache``: the last two write ``NAME/seedS/c_matrix.safetensors``
or ``NAME/seedS/cache.safetensors`` from the finished run ``run: OTHER``; a proxy export takes
``from: learned|measured|auto``), optional ``seeds`` overriding the global ones, ``table:
false`` to leave it out of the table, ``exclusive: true`` to train it alone on the machine
(no other run of the sweep at the same time, all threads: its ``train_seconds`` is then a
clean wall-clock time), and config keys. In a value, ``{runs_dir}`` is replaced by the runs
directory and ``{seed}`` by the run's seed, so a student can name a teacher run:
``teacher: network:{runs_dir}/teacher-lspp/seed{seed}``; such a run waits for that one.

Learning rates chosen on validation data: with a top-level ``select`` mapping (``lr``: the
grid; ``val_fraction``, default 0.1; ``val_seed``, default 0; ``seeds``, default [0]) every
train or distill run without an ``lr`` of its own (and without ``lr_from``) is first trained
once per grid value and selection seed on the training set minus a stratified, seeded
validation share (``NAME/select/lr{LR}-seed{S}``, evaluated on that share, never on the test
set). The rate with the best mean validation accuracy (ties: the smaller rate) is then used
for every seed on the full training set (``NAME/seed{S}``), whose test metrics alone make the
table. A run's ``lr_grid`` replaces the grid for that run; ``lr_from: OTHER`` reuses the rate
chosen for run OTHER. The chosen rate is in the CSV's ``lr`` column and every validation
result in ``RESULTS_selection.csv``.

A grid must bracket its optimum: when the best rate is the grid's largest, the grid grows by its
own top ratio (0.2 after 0.1 adds 0.4), and when it is the smallest, by its bottom ratio downwards,
until the best rate is interior or ``select.extend`` rates (default 3) were added on that side.
The added rates are validation runs like the others (``extended`` in the selection CSV), and the
CSVs' ``grid`` column says for each run whether its rate is ``interior``, at an edge after the
``cap`` of extensions, or at an ``edge`` of a grid that cannot grow (one value, or ``extend: 0``).
A validation run whose loss stops being finite counts as the worst result (``stopped.json`` in its
directory says why; ``stopped`` in the CSV); the other runs go on.

With ``calibrate: true`` every final run is also temperature-scaled when it finishes (``kd calibrate``:
``calibration.json``), and the CSV gains ``temperature`` and the test set's NLL, ECE and adaptive ECE after
scaling (``test_nll_ts``, ``test_ece_ts``, ``test_aece_ts``); a committed row without them is trained again
(and stays in the table until its new run replaces it, so the results can be committed while that goes on).

A run whose ``summary.json`` exists is skipped (after checking that its config.yaml holds
the values this file asks for, so two sweep files can share runs), so an interrupted sweep
resumes where it stopped. The results are rewritten after every finished run, so that they can
be committed as they grow. A run whose directory is gone (a fresh clone, another machine) but
whose row is in the committed results of a sweep file beside this one with the same
``runs_dir`` is not trained again: the row is kept, and a validation row still chooses its
rate. Such a row is used only when its name, seed, verb, model, method, preprocessing, epochs
and learning rate are what this file asks for (validation rows: the rate, split share and
split seed). A run whose directory other runs read (a teacher, an export's source) and an
export are run again only when a run that reads them has to run. A run killed between epochs
continues from its checkpoint. A run directory left with neither a summary nor a checkpoint is
moved aside to ``seedS.interrupted-TIME``, never deleted. With ``--jobs N`` N runs train at once, each in a
process of its own with the machine's threads split between them (on a GPU they share it);
a run starts when the runs it names have finished. A failed run is reported and the others
go on; its dependants are skipped.
"""
from kd.app.sweep.spec import load_sweep, references
from kd.app.sweep.plan import Plan, Task, selection_frame
from kd.app.sweep.tables import collect, selection_table, summary_table, write_results
from kd.app.sweep.run import execute, pending, run_sweep

__all__ = ["load_sweep", "references", "Plan", "Task", "collect", "selection_frame", "selection_table", "summary_table",
           "write_results", "execute", "pending", "run_sweep"]
