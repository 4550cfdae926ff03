"""The parameter table: every bad value is refused with its reason; params files are read the way
ROS reads them (wildcard first, then the node's own keys)."""
import pytest

from ros_ot_fusion import params as P


@pytest.mark.parametrize("bad, reason", [
    ({"rho": -1.0}, "rho must lie in"),
    ({"qos_depth": 2.5}, "qos_depth must be an integer"),
    ({"device": "gpu"}, "device must be one of"),
    ({"prior_extrinsic": [0, 0, 0, 0, 0, 0, 0]}, "quaternion"),
    ({"prior_extrinsic": [0, 0, 0, 1]}, "must hold 7 numbers"),
    ({"eps_schedule": [0.001, 0.1]}, "must not increase"),
    ({"warm_start": 1}, "true or false"),
    ({"no_such_parameter": 1}, "unknown parameter"),
    ({"min_range_m": 50.0, "max_range_m": 10.0}, "min_range_m must be under"),
])
def test_invalid_values_are_refused_with_the_reason(bad, reason):
    with pytest.raises(ValueError, match=reason):
        P.validate(bad)


def test_defaults_are_valid_and_use_sim_time_is_left_to_rclpy():
    assert P.validate({"use_sim_time": True}) == P.defaults()


def test_params_file_keys(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("/**:\n  ros__parameters:\n    rho: 0.3\n    tol: 0.5\n"
                 "/**/ros_ot_fusion:\n  ros__parameters:\n    tol: 0.01\n"
                 "other_node:\n  ros__parameters:\n    rho: 9.0\n")
    assert P.load_params_file(f) == {"rho": 0.3, "tol": 0.01}
    f.write_text("other_node:\n  ros__parameters:\n    rho: 9.0\n")
    with pytest.raises(ValueError, match="no ros__parameters"):
        P.load_params_file(f)
