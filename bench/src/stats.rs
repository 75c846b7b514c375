//! The benchmark's statistics over repeated runs: the median and the spread
//! (min..max) of one figure across a cell's runs.

/// A figure's median and range over runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The median (the mean of the middle two when the count is even) and the
/// range of `values`; all NaN when there are none.
pub fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// The median of `values`, as [`spread`] takes it.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    spread(values).median
}
