"""PolicyRequests, RecurrentRows and env_actions_fn: what an actor sends and what it makes of the answer."""
import gymnasium
import numpy as np
import pytest

from rlbatch.actors.policy_io import PolicyRequests, RecurrentRows, env_actions_fn
from rlbatch.errors import InvalidRequest

EXAMPLE = np.zeros(2, np.float32)


def test_one_environment_sends_its_observation_in_the_policys_dtype():
    requests = PolicyRequests(EXAMPLE, k=1)
    obs = np.array([1.5, 2.5], np.float32)
    assert requests.request([obs]) is obs  # already fits: no copy
    converted = requests.request([np.array([1.5, 2.5])])
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, [1.5, 2.5])


def test_k_environments_send_one_stacked_request_in_the_policys_dtype():
    requests = PolicyRequests(EXAMPLE, k=3)
    request = requests.request([np.array([j, -j], np.float64) for j in range(3)])
    assert request.dtype == np.float32
    np.testing.assert_array_equal(request, [[0, 0], [1, -1], [2, -2]])


@pytest.mark.parametrize("example, dtype", [(EXAMPLE, np.float32), (None, np.float64)])
def test_a_vector_environments_batch_is_converted_and_copied_in_one_request(example, dtype):
    batch = np.array([[0, 0], [1, -1], [2, -2]], np.float64)
    request = PolicyRequests(example, k=3).request(batch)
    assert request.dtype == dtype and not np.shares_memory(request, batch)
    np.testing.assert_array_equal(request, batch)
    one = PolicyRequests(example, k=1).request(batch[:1])
    assert one.shape == (2,) and one.dtype == dtype and not np.shares_memory(one, batch)
    np.testing.assert_array_equal(one, [0, 0])


def test_without_an_example_nothing_is_converted():
    requests = PolicyRequests(None, k=2)
    request = requests.request([np.zeros(2, np.float64), np.ones(2, np.float64)])
    assert request.dtype == np.float64
    assert requests.misfit(np.zeros(5)) is None
    assert requests.refused_columns([np.zeros(2), np.zeros(2)]) == [(0, None), (1, None)]


def test_observations_that_do_not_stack_are_an_invalid_request():
    requests = PolicyRequests(EXAMPLE, k=3)
    with pytest.raises(InvalidRequest, match=r"the 3 observations do not stack into one request: "
                                             r"float32\[2\], float32\[3\], float32\[2\]"):
        requests.request([np.zeros(2, np.float32), np.zeros(3, np.float32), np.zeros(2, np.float32)])


def test_misfit_says_what_was_expected_and_what_came():
    requests = PolicyRequests(EXAMPLE, k=1)
    assert requests.misfit(np.zeros(2, np.float64)) is None  # converted, so it fits
    assert requests.misfit(np.zeros(3, np.float32)) == "expected an observation float32[2], got float32[3]"
    assert requests.misfit(np.array([0.0, np.nan], np.float32)) == \
        "expected finite values, got NaN or inf in float32[2]"
    assert requests.misfit(np.array([np.inf, 0.0])) == "expected finite values, got NaN or inf in float64[2]"


def test_misfit_of_pytree_observations_names_the_leaf():
    requests = PolicyRequests({"pos": np.zeros(2, np.float32), "id": np.int32(0)}, k=1)
    assert requests.misfit({"pos": np.zeros(2, np.float32), "id": np.int32(3)}) is None
    assert requests.misfit({"pos": np.zeros(4, np.float32), "id": np.int32(3)}) == \
        "expected an observation at ['pos'] float32[2], got float32[4]"
    assert requests.misfit({"pos": np.zeros(2, np.float64), "id": np.int32(3)}) == \
        "expected an observation at ['pos'] float32[2], got float64[2]"
    assert requests.misfit({"pos": np.zeros(2, np.float32)}).startswith("expected an observation of structure")


def test_a_refused_request_is_blamed_on_the_rows_that_do_not_fit_else_on_all():
    requests = PolicyRequests(EXAMPLE, k=3)
    good, nan, wide = np.zeros(2, np.float32), np.full(2, np.nan, np.float32), np.zeros(3, np.float32)
    assert requests.refused_columns([good, nan, good]) == [(1, "expected finite values, got NaN or inf in float32[2]")]
    assert requests.refused_columns([wide, good, nan]) == [
        (0, "expected an observation float32[2], got float32[3]"),
        (2, "expected finite values, got NaN or inf in float32[2]")]
    assert requests.refused_columns([good, good, good]) == [(0, None), (1, None), (2, None)]


def test_recurrent_rows_reset_only_the_row_whose_episode_starts():
    rows = RecurrentRows({"h": np.array([1.0, 2.0]), "c": np.float32(7)}, k=3)
    assert rows.recurrent
    initial = rows.initial
    np.testing.assert_array_equal(initial["h"], [[1, 2]] * 3)
    np.testing.assert_array_equal(initial["c"], [7, 7, 7])
    state = {"h": np.arange(6.0).reshape(3, 2), "c": np.array([10, 11, 12], np.float32)}
    state["h"].flags.writeable = False  # as a policy's output may be
    reset = rows.reset(state, 1)
    np.testing.assert_array_equal(reset["h"], [[0, 1], [1, 2], [4, 5]])
    np.testing.assert_array_equal(reset["c"], [10, 7, 12])
    np.testing.assert_array_equal(state["c"], [10, 11, 12])  # the policy's output is left as it came


def test_recurrent_rows_of_one_environment_have_no_row_axis_and_feed_forward_has_none():
    rows = RecurrentRows(np.float32(3), k=1)
    assert rows.initial == 3 and rows.initial.shape == ()
    assert rows.reset(np.float32(9), 0) == 3
    feed_forward = RecurrentRows(None, k=4)
    assert not feed_forward.recurrent and feed_forward.initial is None and feed_forward.reset(None, 2) is None


def test_discrete_actions_go_to_the_environments_as_python_ints():
    space = gymnasium.spaces.Discrete(3)
    one = env_actions_fn(space, np.int32(2), k=1)(np.int32(2))
    assert one == [2] and type(one[0]) is int
    three = env_actions_fn(space, np.array([0, 1, 2], np.int32), k=3)(np.array([2, 0, 1], np.int32))
    assert three == [2, 0, 1] and all(type(a) is int for a in three)


def test_box_actions_are_clipped_for_the_environments():
    space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
    one = env_actions_fn(space, np.zeros(2, np.float32), k=1)(np.array([3.0, -0.5], np.float32))
    np.testing.assert_array_equal(one[0], [1.0, -0.5])
    two = env_actions_fn(space, np.zeros((2, 2), np.float32), k=2)(np.array([[3.0, -0.5], [-4.0, 0.25]], np.float32))
    np.testing.assert_array_equal(two[0], [1.0, -0.5])
    np.testing.assert_array_equal(two[1], [-1.0, 0.25])


def test_multi_discrete_actions_go_to_the_environments_as_arrays():
    space = gymnasium.spaces.MultiDiscrete([2, 3])
    action = np.array([1, 2], np.int64)
    assert env_actions_fn(space, action, k=1)(action)[0] is action
