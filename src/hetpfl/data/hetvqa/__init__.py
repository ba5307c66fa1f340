"""HetVQA: hetpfl's own multi-modal, multi-task benchmark with task shift over time (a CPU-scale
analogue of FedMosaic's DRAKE, built from MNIST, Fashion-MNIST, CIFAR-10 and scikit-learn's digits).

See ``docs/benchmarks.md``. Pieces: :mod:`.images` (one image format, disjoint subsets, domains),
:mod:`.tasks` (22 tasks in five families), :mod:`.text` (vocabulary, scoring), :mod:`.examples`
(task subsets as arrays, model batches), :mod:`.scenario` (scenario files, the dynamic/static
schedule, the replay memory).
"""

from .examples import MAX_IMAGES, NUM_IMAGE_CLASSES, TEXT_LENGTH, class_offset, Batch, TaskExamples, TaskSet, build_examples, build_task_sets, make_batch
from .federated import ClientExamples, ExampleStore, HetVQAData, HetVQAOptions, build_hetvqa_data
from .images import DOMAINS, IMAGE_SHAPE, NUM_SUBSETS, PRETRAIN_SUBSET, SOURCES, ImagePool, load_image_pool
from .scenario import MODES, UNSEEN_KINDS, ClientPlan, ReplayMemory, Scenario, load_scenario, parse_scenario, read_scenario
from .tasks import CLASS_WORDS, FAMILIES, TASKS, TEMPLATES, TaskSpec, all_words, parse_task
from .text import Vocabulary, exact_match, token_f1


def vocabulary() -> Vocabulary:
    """HetVQA's vocabulary (the same everywhere: built from the task templates, not from data)."""
    return Vocabulary(all_words())


__all__ = [
    "CLASS_WORDS", "DOMAINS", "FAMILIES", "IMAGE_SHAPE", "MAX_IMAGES", "MODES", "UNSEEN_KINDS", "NUM_IMAGE_CLASSES", "class_offset", "NUM_SUBSETS", "PRETRAIN_SUBSET",
    "SOURCES", "TASKS", "TEMPLATES", "TEXT_LENGTH", "Batch", "ClientPlan", "ImagePool", "ReplayMemory", "Scenario",
    "TaskExamples", "TaskSet", "ClientExamples", "ExampleStore", "HetVQAData", "HetVQAOptions", "build_hetvqa_data", "TaskSpec", "Vocabulary", "all_words", "build_examples", "build_task_sets",
    "exact_match", "load_image_pool", "load_scenario", "make_batch", "parse_scenario", "read_scenario", "parse_task", "token_f1",
    "vocabulary",
]
