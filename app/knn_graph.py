"""Build the KNN graph of a run's classes (the code lives in the package `app/knn/`).

    mpirun -np N python -m app.knn_graph --run RUN_DIR --k K [--index auto|flat|ivf|hnsw]

builds the graph of the newest complete checkpoint of RUN_DIR on any number of ranks and writes
`RUN_DIR/knn/graph-step-NNNNNNNN.h5`; `--help` lists the options.
"""
import sys

from app.knn.cli import main

if __name__ == "__main__":
    sys.exit(main())
