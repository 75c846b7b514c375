//! The benchmark's statistics: the one median (and quantile) that the
//! matrix's reports, the figures and the model all use, and the spread
//! (min..max) of a figure over a cell's runs.
//!
//! The median is the *upper median* of the values that are numbers: sort
//! them and take the one at index n/2. For an odd count (the bench's
//! default of 3 runs) that is the middle value; for an even count, the
//! upper of the middle two. It is always a value some run produced — a
//! whole number of rounds, and the same run whose bytes per round the
//! figures draw — and a run that reported no figure (NaN: QEMU's downtime
//! of a migration it did not finish) is left out rather than sorted to one
//! end. With no numbers at all, the median is NaN.

/// A figure's median and range over runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The finite values of `values`, sorted.
fn sorted(values: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `q` quantile (0 ≤ q ≤ 1) of the finite values: the one at index
/// ⌊n·q⌋ of them sorted (the last for q = 1); NaN when there are none.
pub fn quantile(values: impl IntoIterator<Item = f64>, q: f64) -> f64 {
    let v = sorted(values);
    let i = ((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1));
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// The median: the upper median of the finite values (see the module).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    quantile(values, 0.5)
}

/// The median and range of the finite values; all NaN when there are none.
pub fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let v = sorted(values);
    match (v.first(), v.last()) {
        (Some(&min), Some(&max)) => Spread {
            median: v[v.len() / 2],
            min,
            max,
        },
        _ => Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_upper_one_of_the_numbers() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 3.0, "upper of the middle two");
        assert_eq!(median([5.0]), 5.0);
        assert_eq!(median([f64::NAN, 1.0, 9.0]), 9.0, "NaN is left out");
        assert!(median([]).is_nan());
        assert!(median([f64::NAN, f64::INFINITY]).is_nan());
    }

    #[test]
    fn spread_and_quantile_agree_with_the_median() {
        let runs = [30.0, f64::NAN, 10.0, 20.0];
        assert_eq!(
            spread(runs),
            Spread {
                median: 20.0,
                min: 10.0,
                max: 30.0
            }
        );
        assert_eq!(spread(runs).median, median(runs));
        let tens: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(tens.iter().copied(), 0.9), 10.0);
        assert_eq!(quantile(tens.iter().copied(), 0.0), 1.0);
        assert_eq!(quantile(tens.iter().copied(), 1.0), 10.0);
        assert!(spread([]).min.is_nan());
    }
}
