//! Waiting for a cluster to reach a state: poll a probe until it yields a value.

use std::time::{Duration, Instant};

use anyhow::bail;

/// Polls `probe` every `every` until it yields `Some`, for at most `limit`. A probe error
/// counts as "not yet" (the API server may still be starting) and is quoted if time runs
/// out; `abort` is checked before each attempt and ends the wait at once when it fails.
pub async fn until<T, F, Fut>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut abort: impl FnMut() -> anyhow::Result<()>,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = None;
    loop {
        abort()?;
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if start.elapsed() > limit {
            let why = last
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("{what}: not within {:.1}s{why}", limit.as_secs_f64());
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn yields_the_first_value_and_quotes_the_last_error() {
        let mut n = 0;
        let v = until(
            Duration::from_secs(1),
            MS,
            "three",
            || Ok(()),
            || {
                n += 1;
                let n = n;
                async move {
                    if n < 3 {
                        bail!("attempt {n}")
                    } else {
                        Ok(Some(n))
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(v, 3);

        let err = until(
            10 * MS,
            MS,
            "never",
            || Ok(()),
            || async { bail!("still starting") as anyhow::Result<Option<()>> },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("never: not within 0.0s (last error: still starting"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn abort_ends_the_wait_at_once() {
        let err = until(
            Duration::from_secs(60),
            MS,
            "x",
            || bail!("etcd exited"),
            || async { Ok(None::<()>) },
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "etcd exited");
    }
}
