import numpy as np
import pytest
from scipy import sparse

from models.data.partitions import build_clients
from models.data.sharding import assign_clients
from models.federation.evaluation import summarize_evaluation
from models.metrics import add_sums, distribution, finalize_metrics, ranking_sums, rating_error_sums
from models.mf.federated import MFConfig, evaluate_client, init_global_state
from tests.unit.helpers import low_rank_interactions


def test_rating_errors_by_hand():
    sums = rating_error_sums(np.array([3.0, 4.0, 5.0]), np.array([4.0, 4.0, 2.0]))
    metrics = finalize_metrics(sums, k=10)
    assert metrics["rmse"] == pytest.approx(np.sqrt((1 + 0 + 9) / 3))
    assert metrics["mae"] == pytest.approx(4 / 3)


def test_ranking_metrics_by_hand():
    # user 0: item 0 seen; ranking of the rest by score: 4, 3, 2, 1; relevant {3, 1}; k = 2
    scores = np.array([[9.0, 1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    exclude = sparse.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    relevant = sparse.csr_matrix(
        np.array([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    )  # user 1: nothing relevant

    sums, recommended = ranking_sums(scores, exclude, relevant, k=2)

    assert sums["users"] == 1
    assert sums["precision"] == pytest.approx(0.5)  # top-2 = [4, 3]: one hit
    assert sums["recall"] == pytest.approx(0.5)
    assert sums["hit"] == 1
    assert sums["ndcg"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert sums["map"] == pytest.approx((1 / 2) / 2)
    np.testing.assert_array_equal(recommended, [1, 1, 0, 1, 1])  # user 1 gets [0, 1]


def test_seen_items_are_never_recommended():
    scores = np.array([[10.0, 9.0, 1.0]])
    exclude = sparse.csr_matrix(np.array([[1, 1, 0]]))
    relevant = sparse.csr_matrix(np.array([[0, 0, 1]]))
    sums, recommended = ranking_sums(scores, exclude, relevant, k=3)
    assert sums["hit"] == 1 and sums["precision"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(recommended, [0, 0, 1])


def test_finalize_leaves_out_metrics_without_denominator():
    assert finalize_metrics({"sse": 0.0, "n": 0.0, "users": 0.0}, k=10) == {}


def test_distribution_by_hand():
    d = distribution([4.0, 1.0, 3.0, 2.0])
    assert d == {"min": 1.0, "p10": pytest.approx(1.3), "median": 2.5, "max": 4.0}


def test_federated_evaluation_equals_centralized_evaluation():
    data = low_rank_interactions(n_users=90, n_items=40, density=0.4, noise=0.5)
    rng = np.random.default_rng(3)
    split = rng.choice([0, 1, 2], size=len(data.frame), p=[0.7, 0.1, 0.2]).astype(np.int8)
    config = MFConfig(n_factors=3, relevance_threshold=3.0, top_k=5)
    state = init_global_state(data.n_items, config, [{"rating_sum": 3.0 * 10, "n": 10.0}], seed=1)
    one_client = np.zeros(data.n_users, dtype=np.int32)
    many = assign_clients(data, n_clients=5, strategy="iid", rng=np.random.default_rng(0))

    central = summarize_evaluation(
        [
            evaluate_client(c, state.params, config, "test")
            for c in build_clients(data, one_client, split)
        ],
        config.top_k,
        data.n_items,
        "test",
    )
    federated = summarize_evaluation(
        [
            evaluate_client(c, state.params, config, "test")
            for c in build_clients(data, many, split)
        ],
        config.top_k,
        data.n_items,
        "test",
    )

    for key in (
        "test/rmse",
        "test/mae",
        "test/ndcg_at_5",
        "test/recall_at_5",
        "test/precision_at_5",
        "test/map_at_5",
        "test/hit_at_5",
        "test/coverage_at_5",
    ):
        assert federated[key] == pytest.approx(central[key], abs=1e-12), key
    assert (
        federated["test/client_min/rmse"]
        <= federated["test/rmse"]
        <= federated["test/client_max/rmse"]
    )


def test_add_sums_adds_key_wise():
    assert add_sums([{"a": 1.0}, {"a": 2.0, "b": 3.0}]) == {"a": 3.0, "b": 3.0}


@pytest.mark.parametrize(("n_users", "n_items"), [(0, 5), (3, 0), (0, 0)])
def test_ranking_sums_of_no_users_or_no_items_are_zero(n_users, n_items):
    empty = sparse.csr_matrix((n_users, n_items))

    sums, recommended = ranking_sums(np.zeros((n_users, n_items)), empty, empty, k=10)

    assert sums["users"] == 0.0 and all(v == 0.0 for v in sums.values())
    assert recommended.shape == (n_items,) and not recommended.any()


def test_coverage_needs_both_the_catalogue_and_the_covered_count():
    sums = {"sse": 1.0, "sae": 1.0, "n": 1.0}

    assert "coverage_at_10" not in finalize_metrics(sums, k=10, n_items=50)
    assert "coverage_at_10" not in finalize_metrics(sums | {"covered": 5.0}, k=10)
    assert finalize_metrics(sums | {"covered": 5.0}, k=10, n_items=50)["coverage_at_10"] == 0.1


def test_one_rating_one_user_and_one_client_are_enough_for_a_metric():
    ranking = {"precision": 0.1, "recall": 1.0, "ndcg": 0.5, "hit": 1.0, "map": 0.5}
    one = finalize_metrics({"sse": 4.0, "sae": 2.0, "n": 1.0, "users": 1.0} | ranking, k=10)

    assert one["rmse"] == 2.0 and one["mae"] == 2.0  # a client with one held-out rating
    assert one["ndcg_at_10"] == 0.5  # and one evaluated user
    assert distribution([0.7]) == {"min": 0.7, "p10": 0.7, "median": 0.7, "max": 0.7}
    assert distribution([]) == {}


# numpy partitions catalogues of a few hundred items and more differently from small ones
@pytest.mark.parametrize(("n_items", "k"), [(30, 5), (300, 1), (400, 10)])
def test_ranking_sums_equal_a_loop_over_users_with_a_full_sort(n_items, k):
    # oracle: per user, a full sort of the unseen items and the metrics' textbook definitions
    rng = np.random.default_rng(7)
    n_users = 40
    scores = rng.normal(size=(n_users, n_items))  # continuous: no ties
    seen = rng.random((n_users, n_items)) < 0.3
    seen[0, 3:] = True  # fewer unseen items than k (but k = 1): the list is short
    relevant = rng.random((n_users, n_items)) < 0.2
    relevant[1] = False  # a user with nothing relevant is not evaluated

    sums, recommended = ranking_sums(
        scores, sparse.csr_matrix(seen.astype(float)), sparse.csr_matrix(relevant.astype(float)), k
    )

    expected = dict.fromkeys(("precision", "recall", "ndcg", "hit", "map", "users"), 0.0)
    expected_recommended = np.zeros(n_items)
    for u in range(n_users):
        unseen = [i for i in range(n_items) if not seen[u, i]]
        top = sorted(unseen, key=lambda i: -scores[u, i])[:k]
        for i in top:
            expected_recommended[i] += 1
        wanted = set(np.flatnonzero(relevant[u]).tolist())
        if not wanted:
            continue
        found = [i in wanted for i in top]
        dcg = sum(1 / np.log2(rank + 2) for rank, hit in enumerate(found) if hit)
        idcg = sum(1 / np.log2(rank + 2) for rank in range(min(len(wanted), k)))
        precisions = [sum(found[: rank + 1]) / (rank + 1) for rank, hit in enumerate(found) if hit]
        expected["precision"] += sum(found) / k
        expected["recall"] += sum(found) / len(wanted)
        expected["ndcg"] += dcg / idcg
        expected["hit"] += float(any(found))
        expected["map"] += sum(precisions) / min(len(wanted), k)
        expected["users"] += 1

    assert sums == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(recommended, expected_recommended)


def test_finalize_gives_rating_metrics_without_ranking_sums_and_the_reverse():
    rating = rating_error_sums(np.array([1.0, 2.0]), np.array([1.0, 4.0]))
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    # user 0's relevant item is ranked second (a hit at k=2), user 1's third (a miss)
    relevant = sparse.csr_matrix(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    ranking, _ = ranking_sums(scores, sparse.csr_matrix((2, 3)), relevant, k=2)

    assert finalize_metrics(rating, k=2) == {"rmse": pytest.approx(np.sqrt(2.0)), "mae": 1.0}
    only_ranking = finalize_metrics(ranking, k=2)
    assert set(only_ranking) == {
        "precision_at_2",
        "recall_at_2",
        "ndcg_at_2",
        "hit_at_2",
        "map_at_2",
    }
    # means over the two users: recall (1 + 0) / 2, precision (1/2 + 0) / 2
    assert only_ranking["recall_at_2"] == 0.5 and only_ranking["precision_at_2"] == 0.25
    assert only_ranking["hit_at_2"] == 0.5


def test_metrics_from_noisy_sums_are_kept_within_what_exact_sums_can_give():
    """Sums released with DP noise: an NDCG sum above the user count, an absolute-error sum whose
    MAE exceeds the RMSE. Exact sums never do either, so bounding them is post-processing."""
    noisy = {"sse": 400.0, "sae": 600.0, "n": 100.0, "users": 50.0, "precision": 20.0,
             "recall": 30.0, "ndcg": 53.5, "hit": 57.0, "map": 10.0}  # fmt: skip

    metrics = finalize_metrics(noisy, k=10)

    assert metrics["rmse"] == 2.0 and metrics["mae"] == 2.0  # 6.0 from the sums
    assert metrics["ndcg_at_10"] == 1.0 and metrics["hit_at_10"] == 1.0
    assert metrics["recall_at_10"] == 0.6 and metrics["precision_at_10"] == 0.4
    exact = {"sse": 400.0, "sae": 150.0, "n": 100.0, "users": 50.0, "precision": 20.0,
             "recall": 30.0, "ndcg": 50.0, "hit": 50.0, "map": 10.0}  # fmt: skip
    assert finalize_metrics(exact, k=10)["mae"] == 1.5
    assert finalize_metrics(exact, k=10)["ndcg_at_10"] == 1.0  # a bound reached, not passed
