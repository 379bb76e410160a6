use anyhow::Result;
pub fn run(_a: &[String]) -> Result<()> {
    anyhow::bail!("todo")
}
