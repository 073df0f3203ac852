"""`kd report RUN_DIR [RUN_DIR ...] --out DIR`: the paper's figures (3-6) and more, as PNG + CSV + index.md.

Inputs are finished run directories (from `kd train-teacher`, `kd distill` or `kd sweep`) or
C-matrix files (``c_matrix.safetensors`` from an LS++ run or `kd proxy export`); ``--bench``
adds `kd bench` CSV files. ``--out`` must be a new (or empty) directory. Every figure gets a
CSV of the numbers it shows (a matrix as a K x K table, class names as header row and first
column), and ``index.md`` shows each figure with one line saying what it is and which run made it.
``figures.csv`` lists every PNG with its pixel size and caption. Figures that compare runs put
them side by side on one colour scale.

Figures:

1. ``c_matrix.png`` (paper Fig. 3): the C-matrix of every LS++ run (learned) and every C file,
   values in the cells; for K > 20 a table of each class's strongest neighbours in index.md
   (``c_neighbours_*.csv``) instead of a heatmap.
2. ``class_probs.png`` (paper Fig. 4): per run, the mean softmax over the un-augmented training
   set for each true class (row: true class, column: predicted class), on a log colour scale so
   that both a near-one-hot diagonal and the structure of the small entries are visible.
3. ``features.png`` (paper Fig. 5): per run, a t-SNE (scikit-learn, seeded) of the penultimate
   features of a fixed seeded subset of the test set (``--tsne-points``, default 2000),
   coloured by class; below it the L1-normalised cosine distance among the class centres of
   those features: D_ij = 1 - cos(m_i, m_j), divided by sum_ij D_ij (so the matrix sums to 1,
   stays symmetric and has a zero diagonal).
4. ``reliability.png``: per run, accuracy against confidence in 15 equal-width bins (the bins of
   :func:`kd.metrics.expected_calibration_error`), with ECE-15 (that function), adaptive ECE
   (15 equal-mass bins, :func:`kd.metrics.adaptive_ece`) and the NLL printed on it; test set.
5. ``curves.png``: from each run's metrics.csv, train loss, each named loss term, test accuracy
   and test ECE per epoch, runs overlaid.
6. ``cost_<name>.png`` per ``--bench`` CSV: median step time per source (log scale, min-max
   whiskers) with the ratio to 1-hot written on each bar.
7. ``ablation_c_matrices.png`` (paper Fig. 6): where the runs include the LS++ loss variants
   (``lspp-ce``, ``lspp-sce``), their C-matrices beside LS++'s, each row's entropy (bits) printed.

Cost: figures 1, 5, 6 and 7 read files only. Figures 2-4 need the network run once over the
training set (class-mean softmax) and once over the test set (logits, penultimate features of
the subset); these outputs and the t-SNE embedding are cached as safetensors files under
``--cache`` (default ``DIR/cache``), one file per run, named by a hash of the run's weights,
the data set and the subset size. ``--out`` is always new; to reuse the model outputs of an
earlier report, point ``--cache`` at its cache folder (``--cache OLD_DIR/cache``): present
files are read, missing ones added, none is ever overwritten.

Penultimate features, per model kind:

* timm models (``timm:NAME`` or a bare timm name): ``forward_head(forward_features(x),
  pre_logits=True)``, the model's own feature method; the logits are ``forward_head`` of the
  same features, so the network runs once.
* every other model (``lenet``, ``mlp``, ``resnet18`` ... ``resnet101``, ``shufflenetv2``,
  ``densenet121``, ``torchvision:NAME``): a forward pre-hook on the last ``nn.Linear`` module,
  i.e. the input of the classifier layer: LeNet's 84-d ``classifier[-1]`` input, the MLP's
  last hidden layer (``net[-1]``), the global-pooled ``fc`` input of the ResNets and
  ShuffleNetV2, the pooled ``classifier`` input of DenseNet121, and the input of the last
  linear layer of a torchvision model (``fc``, ``classifier[-1]`` or ``heads.head``). A model
  without a linear layer gets no feature figure (a one-line error says so).
"""
from kd.app.report.inputs import Source, read_bench, read_source
from kd.app.report.outputs import compute_outputs, tsne
from kd.app.report.assemble import make_report

__all__ = ["make_report", "Source", "read_source", "read_bench", "compute_outputs", "tsne"]
